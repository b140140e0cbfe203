use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use imprint::editor::{Editor, EditorSettings};
use imprint::eval::locality::{LocalityReport, Snapshot};
use imprint::eval::upqa::{markdown, EvalMethod, EvalMode, UpqaRun};
use imprint::eval::upqa_data::{load_clusters, load_items};

use super::App;

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// UPQA: teach each item's preference, then ask explicit, paraphrased, implicit and product questions.
    Upqa(UpqaArgs),
    /// How much the active edits change unrelated answers, general knowledge and perplexity.
    Locality(LocalityArgs),
}

#[derive(Debug, Args)]
pub struct LocalityArgs {
    /// A model name or GGUF path.
    #[arg(long)]
    model: Option<String>,
    /// Also write report.json and report.md into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UpqaArgs {
    /// A UPQA JSON file (e.g. ../shared/data/upqa/balanced_subset.json), read in place.
    #[arg(long)]
    data: PathBuf,
    /// The matching *_cluster9.json file: its last k questions train each edit.
    #[arg(long)]
    clusters: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "ftm")]
    method: EvalMethod,
    /// How many cluster questions train each edit (k, the last k of the cluster).
    #[arg(long, default_value_t = 3)]
    cluster_size: usize,
    #[arg(long, value_enum, default_value = "sequential")]
    mode: EvalMode,
    /// Take every n-th item (balanced_subset lists 10 items per attribute
    /// type in a row: `--every 10` gives one of each type).
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// Only the first n items (after --every).
    #[arg(long)]
    limit: Option<usize>,
    /// A model name or GGUF path.
    #[arg(long)]
    model: Option<String>,
    /// Folder for report.json and report.md.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(app: &App, cmd: EvalCommand) -> Result<ExitCode> {
    match cmd {
        EvalCommand::Upqa(args) => upqa(app, args),
        EvalCommand::Locality(args) => locality(app, args),
    }
}

/// The base model's locality snapshot, cached per model, system prompt and
/// prompt sets (it takes about a minute on two cores).
pub fn base_snapshot(
    app: &App,
    engine: &mut imprint::engine::Engine,
    sha: &str,
    system_prompt: &str,
) -> Result<Snapshot> {
    use sha2::Digest;
    let key = hex::encode(sha2::Sha256::digest(format!(
        "{sha}\u{0}{system_prompt}\u{0}{:?}\u{0}{:?}",
        imprint::eval::locality::unrelated_prompts(),
        imprint::eval::locality::knowledge_questions()
    )));
    let path = app
        .paths
        .cache_dir
        .join("eval")
        .join(format!("{}.locality.json", &key[..16]));
    if let Some(snapshot) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Snapshot>(&t).ok())
    {
        return Ok(snapshot);
    }
    let previous = engine.adapter_path().map(std::path::Path::to_path_buf);
    engine.set_adapter(None)?;
    let spinner = app.spinner("measuring the base model on the locality sets");
    let snapshot = Snapshot::take(engine, system_prompt, None);
    spinner.finish_and_clear();
    engine.set_adapter(previous.as_deref())?;
    let snapshot = snapshot?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string(&snapshot)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(snapshot)
}

fn locality(app: &App, args: LocalityArgs) -> Result<ExitCode> {
    use imprint::editor::store::EditStore;
    let mut engine = super::load_engine(app, args.model.as_deref(), false)?;
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let system_prompt = app.config.config.generation.system_prompt.clone();
    let before = base_snapshot(app, &mut engine, &sha, &system_prompt)?;
    let edits = EditStore::new(&app.paths.data_dir).active_for(&sha)?;
    if edits.is_empty() {
        println!("No active edits for this model: nothing to compare.");
        return Ok(ExitCode::SUCCESS);
    }
    super::attach_active_edits(app, &mut engine)?;
    let spinner = app.spinner(&format!(
        "measuring the model with {} edit(s) on the locality sets",
        edits.len()
    ));
    let after = Snapshot::take(&mut engine, &system_prompt, Some(&before));
    spinner.finish_and_clear();
    let attributes: Vec<String> = edits.iter().map(|e| e.request.attribute.clone()).collect();
    let report = LocalityReport::compare(&before, &after?, &attributes);
    let md = format!(
        "# Locality of {} active edit(s)\n\n{}",
        edits.len(),
        report.markdown()
    );
    print!("{md}");
    for c in &report.changed_examples {
        println!("  changed: {c}");
    }
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create the output folder {}", out.display()))?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        std::fs::write(out.join("report.md"), &md)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn upqa(app: &App, args: UpqaArgs) -> Result<ExitCode> {
    let mut items = load_items(&args.data)?;
    let mut clusters = match &args.clusters {
        Some(path) => Some(load_clusters(path, &args.data, items.len())?),
        None => None,
    };
    let step = args.every.max(1);
    if step > 1 {
        items = items.into_iter().step_by(step).collect();
        clusters = clusters.map(|c| c.into_iter().step_by(step).collect());
    }
    if let Some(n) = args.limit {
        items.truncate(n);
        if let Some(c) = clusters.as_mut() {
            c.truncate(n);
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;

    let mut engine = super::load_engine(app, args.model.as_deref(), false)?;
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let system_prompt = app.config.config.generation.system_prompt.clone();
    let mut editor = if args.method == EvalMethod::Ftm {
        let settings = EditorSettings {
            system_prompt: system_prompt.clone(),
            ..EditorSettings::default()
        };
        Some(Editor::load(
            &engine.options().model_path,
            &sha,
            &app.paths.cache_dir,
            settings,
        )?)
    } else {
        None
    };
    let run = UpqaRun {
        data_path: &args.data,
        clusters_path: args.clusters.as_deref(),
        items: &items,
        clusters: clusters.as_deref(),
        method: args.method,
        mode: args.mode,
        cluster_size: args.cluster_size,
        system_prompt: &system_prompt,
        model_sha256: &sha,
        adapter_dir: &args.out,
    };
    let bar = app.progress(0, "eval upqa");
    let report = run.run(&mut engine, editor.as_mut(), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let json_path = args.out.join("report.json");
    let md_path = args.out.join("report.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let md = markdown(&report);
    std::fs::write(&md_path, &md).with_context(|| format!("cannot write {}", md_path.display()))?;
    print!("{md}");
    println!("\nWrote {} and {}.", json_path.display(), md_path.display());
    Ok(ExitCode::SUCCESS)
}
