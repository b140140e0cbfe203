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
    /// PrefEval: is a stated preference still honoured after 0, 2, … distractor turns?
    Prefeval(PrefevalArgs),
    /// Preference extraction: precision/recall on UPQA sentences, PrefEval statements, and false positives on written negatives.
    Extract(ExtractArgs),
    /// Draw several runs' reports into one chart per benchmark (accuracy.png, acknowledgment.png) and one table (summary.md).
    Chart(ChartArgs),
}

#[derive(Debug, Args)]
pub struct ChartArgs {
    /// report.json files of `eval upqa` / `eval prefeval` runs, or the
    /// folders that hold them. Each run becomes one series.
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// Folder for the PNG files.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// UPQA_1000.json (labelled sentences), read in place.
    #[arg(long)]
    data: PathBuf,
    /// PrefEval's explicit_preference folder (unlabelled statements).
    #[arg(long)]
    prefeval: Option<PathBuf>,
    /// Where to write report.json and report.md.
    #[arg(long)]
    out: PathBuf,
    /// Also ask the model (grammar-constrained JSON) where no rule matched.
    #[arg(long)]
    llm: bool,
    /// A model name or GGUF path for --llm.
    #[arg(long)]
    model: Option<String>,
    /// Only the first n UPQA sentences and n PrefEval statements.
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Debug, Args)]
pub struct PrefevalArgs {
    /// PrefEval items (e.g. ../shared/data/prefeval/prefeval_pro_balanced.json), read in place.
    #[arg(long)]
    data: PathBuf,
    /// PrefEval's multi-turn conversations (default: filtered_inter_turns_rm_few_items.json next to --data).
    #[arg(long)]
    distractors: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "ftm")]
    method: imprint::eval::prefeval::PrefMethod,
    /// Distractor turn counts to test.
    #[arg(long, value_delimiter = ',', default_value = "0,2,4,6,8,10")]
    turns: Vec<usize>,
    /// Only the first n items.
    #[arg(long)]
    limit: Option<usize>,
    /// New tokens per answer.
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
    /// ftm: train each edit on the test question itself (recall of a trained answer, not preference following). Default: held-out questions about the item's subject.
    #[arg(long)]
    train_on_test_question: bool,
    /// Editor settings for `ftm` (default: the ones `imprint edit` and the
    /// daemon use).
    #[command(flatten)]
    tuning: super::edit::EditorFlags,
    /// A model name or GGUF path.
    #[arg(long)]
    model: Option<String>,
    /// Folder for report.json and report.md.
    #[arg(long)]
    out: PathBuf,
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
    /// single: each edit alone on the base model. sequential: edits stack
    /// in a profile, one profile per persona (at most one item per attribute
    /// type; the j-th item of each type in profile j).
    #[arg(long, value_enum, default_value = "sequential")]
    mode: EvalMode,
    /// Skip the first n items before --every picks. balanced_subset lists
    /// 10 items per attribute type in a row, so `--start 3 --every 10` is
    /// the fourth persona: the fourth item of each type.
    #[arg(long, default_value_t = 0)]
    start: usize,
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
    /// The paper's token budget: target tokens for the explicit question,
    /// +8 for the others (default: target tokens + 16 for every question).
    #[arg(long)]
    paper_budget: bool,
    /// Ask raw prompts without the chat template, as the paper did.
    #[arg(long)]
    raw: bool,
    /// Distractor turns (user + assistant pairs from PrefEval's real
    /// conversations) inserted before each question.
    #[arg(long, default_value_t = 0)]
    turns: usize,
    /// PrefEval's multi-turn conversations, for --turns (default: next to
    /// --data, ../prefeval/filtered_inter_turns_rm_few_items.json).
    #[arg(long)]
    distractors: Option<PathBuf>,
    /// Train each edit on the k cluster questions before the explicit one,
    /// so the explicit score measures a held-out question.
    #[arg(long)]
    hold_out_explicit: bool,
    /// How the cluster's questions are worded for training: `first` turns
    /// UPQA's "What's your favorite pastime?" into "What's my favorite
    /// pastime?", as users ask and as imprint's own clusters are; `verbatim`
    /// keeps the data's wording, as the paper did.
    #[arg(long, value_enum, default_value_t = imprint::eval::upqa_data::ClusterPerson::First)]
    cluster_person: imprint::eval::upqa_data::ClusterPerson,
    /// Skip the locality measurement (unrelated answers, general knowledge,
    /// perplexity) that sequential edit runs make at the end.
    #[arg(long)]
    no_locality: bool,
    /// Editor settings for `ftm`/`rome` (default: the ones `imprint edit` and
    /// the daemon use); recorded in report.json.
    #[command(flatten)]
    tuning: super::edit::EditorFlags,
    /// Folder for report.json and report.md.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(app: &App, cmd: EvalCommand) -> Result<ExitCode> {
    match cmd {
        EvalCommand::Upqa(args) => upqa(app, args),
        EvalCommand::Locality(args) => locality(app, args),
        EvalCommand::Prefeval(args) => prefeval(app, args),
        EvalCommand::Chart(args) => chart(args),
        EvalCommand::Extract(args) => {
            let mut engine = if args.llm {
                Some(super::load_engine(app, args.model.as_deref(), false)?)
            } else {
                None
            };
            let spinner = app.spinner("extracting");
            let report = imprint::eval::extract::run(
                &args.data,
                args.prefeval.as_deref(),
                engine.as_mut(),
                args.limit,
            );
            spinner.finish_and_clear();
            let report = report?;
            std::fs::create_dir_all(&args.out).with_context(|| {
                format!("cannot create the output folder {}", args.out.display())
            })?;
            let mut md = report.markdown();
            md += "\n### Wrong targets (first 25; report.json has up to 200, and up to 200 missed sentences)\n\n";
            for e in report.wrong_examples.iter().take(25) {
                md += &format!(
                    "- {} — gold {} — got {}\n",
                    e.sentence,
                    e.gold,
                    e.predicted.as_deref().unwrap_or("-")
                );
            }
            md += "\n### False positives\n\n";
            for e in &report.false_positive_examples {
                md += &format!("- {e}\n");
            }
            write_report(&args.out, &report, &md, false)
        }
    }
}

fn prefeval(app: &App, args: PrefevalArgs) -> Result<ExitCode> {
    use imprint::eval::prefeval::{load_items, markdown, PrefEvalRun, PrefMethod};
    let mut items = load_items(&args.data)?;
    if let Some(n) = args.limit {
        items.truncate(n);
    }
    let distractors = args.distractors.clone().unwrap_or_else(|| {
        args.data
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("filtered_inter_turns_rm_few_items.json")
    });
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    // Ten distractor turns need more room than a chat does by default.
    let mut engine = super::load_engine_with_context(app, args.model.as_deref(), 8192)?;
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let system_prompt = app.config.config.generation.system_prompt.clone();
    let mut editor = if args.method == PrefMethod::Ftm {
        let settings = args.tuning.apply(EditorSettings {
            system_prompt: system_prompt.clone(),
            ..super::prefs::default_settings(app, &sha, imprint::editor::Method::Ftm)?
        });
        Some(super::load_editor(app, &engine, settings)?.1)
    } else {
        None
    };
    let run = PrefEvalRun {
        data_path: &args.data,
        items: &items,
        method: args.method,
        turns: &args.turns,
        system_prompt: &system_prompt,
        model_sha256: &sha,
        distractors_path: &distractors,
        adapter_dir: &args.out,
        max_new_tokens: args.max_tokens,
        train_on_test_question: args.train_on_test_question,
    };
    let bar = app.progress(0, "eval prefeval");
    let report = run.run(&mut engine, editor.as_mut(), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    write_report(&args.out, &report, &markdown(&report), true)
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
    let mut engine = super::load_engine(app, args.model.as_deref(), false)?;
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let system_prompt = app.config.config.generation.system_prompt.clone();
    let before = base_snapshot(app, &mut engine, &sha, &system_prompt)?;
    let edits = super::open_profile(app)?.active_edits(&sha)?;
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

/// `--start`, then `--every`, then `--limit`, in that order.
fn pick<T>(list: Vec<T>, start: usize, every: usize, limit: Option<usize>) -> Vec<T> {
    let picked = list.into_iter().skip(start).step_by(every.max(1));
    match limit {
        Some(n) => picked.take(n).collect(),
        None => picked.collect(),
    }
}

fn upqa(app: &App, args: UpqaArgs) -> Result<ExitCode> {
    let items = load_items(&args.data)?;
    let clusters = match &args.clusters {
        Some(path) => Some(load_clusters(path, &args.data, items.len())?),
        None => None,
    };
    if args.start > 0 && args.start >= items.len() {
        anyhow::bail!(
            "--start {} skips every item: {} holds {} items",
            args.start,
            args.data.display(),
            items.len()
        );
    }
    // Items and their clusters are parallel lists: the same selection for both.
    let items = pick(items, args.start, args.every, args.limit);
    let clusters = clusters.map(|c| pick(c, args.start, args.every, args.limit));
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;

    let mut engine = if args.turns > 0 {
        // Distractor turns need more room than a chat does by default.
        super::load_engine_with_context(app, args.model.as_deref(), 8192)?
    } else {
        super::load_engine(app, args.model.as_deref(), false)?
    };
    let sha = imprint::models::fingerprint(&app.paths, &engine.options().model_path)?;
    let system_prompt = app.config.config.generation.system_prompt.clone();
    let mut editor = if args.method.edits() {
        let method = match args.method {
            EvalMethod::Rome => imprint::editor::Method::Rome,
            _ => imprint::editor::Method::Ftm,
        };
        let settings = args.tuning.apply(EditorSettings {
            system_prompt: system_prompt.clone(),
            ..super::prefs::default_settings(app, &sha, method)?
        });
        Some(Editor::load(
            &engine.options().model_path,
            &sha,
            &app.paths.cache_dir,
            settings,
        )?)
    } else {
        None
    };
    let distractors = if args.turns > 0 {
        let path = args.distractors.clone().unwrap_or_else(|| {
            args.data
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("../prefeval/filtered_inter_turns_rm_few_items.json")
        });
        imprint::eval::upqa::distractor_pairs(&path)
            .with_context(|| "--turns needs PrefEval's conversations (give --distractors FILE)")?
    } else {
        Vec::new()
    };
    if args.hold_out_explicit && args.clusters.is_none() {
        anyhow::bail!("--hold-out-explicit needs --clusters (the cluster questions to train on)");
    }
    let locality_before =
        if args.method.edits() && args.mode == EvalMode::Sequential && !args.no_locality {
            Some(base_snapshot(app, &mut engine, &sha, &system_prompt)?)
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
        style: imprint::eval::upqa::QuestionStyle {
            paper_budget: args.paper_budget,
            raw: args.raw,
            turns: args.turns,
        },
        hold_out_explicit: args.hold_out_explicit,
        cluster_person: args.cluster_person,
        distractors: &distractors,
        locality_before: locality_before.as_ref(),
    };
    let bar = app.progress(0, "eval upqa");
    let mut report = run.run(&mut engine, editor.as_mut(), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    report.editor = editor
        .as_ref()
        .map(|e| serde_json::to_value(&e.settings))
        .transpose()
        .context("cannot record the editor settings")?;
    write_report(&args.out, &report, &markdown(&report), true)
}

/// Writes `DIR/report.json` and `DIR/report.md` (and, with `chart`, the
/// run's PNG chart) and prints the Markdown.
fn write_report(
    out: &std::path::Path,
    report: &impl serde::Serialize,
    md: &str,
    chart: bool,
) -> Result<ExitCode> {
    let json_path = out.join("report.json");
    let md_path = out.join("report.md");
    let json = serde_json::to_value(report)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    std::fs::write(&md_path, md).with_context(|| format!("cannot write {}", md_path.display()))?;
    print!("{md}");
    let mut written = vec![json_path.clone(), md_path];
    if chart {
        written.extend(imprint::eval::charts::chart_reports(
            &[(json_path, json)],
            out,
        )?);
    }
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("\nWrote {}.", names.join(", "));
    Ok(ExitCode::SUCCESS)
}

/// `imprint eval chart`: one series per report.
fn chart(args: ChartArgs) -> Result<ExitCode> {
    let mut reports = Vec::new();
    for given in &args.reports {
        let path = if given.is_dir() {
            given.join("report.json")
        } else {
            given.clone()
        };
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}; give the report.json of an `imprint eval upqa` or `eval prefeval` run, or its folder",
                path.display()
            )
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON; was it cut short?", path.display()))?;
        reports.push((path, json));
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    for path in imprint::eval::charts::chart_reports(&reports, &args.out)? {
        println!("Wrote {}.", path.display());
    }
    // Rows are named after the run folders.
    let named: Vec<(String, serde_json::Value)> = reports
        .into_iter()
        .map(|(path, json)| {
            let name = path.parent().and_then(|p| p.file_name()).map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            (name, json)
        })
        .collect();
    let md = imprint::eval::charts::summary_markdown(&named);
    let summary = args.out.join("summary.md");
    std::fs::write(&summary, &md).with_context(|| format!("cannot write {}", summary.display()))?;
    print!("{md}");
    println!("Wrote {}.", summary.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn items_are_picked_by_start_then_every_then_limit() {
        let items: Vec<usize> = (0..30).collect();
        assert_eq!(pick(items.clone(), 2, 10, None), vec![2, 12, 22]);
        assert_eq!(pick(items.clone(), 2, 10, Some(2)), vec![2, 12]);
        assert_eq!(pick(items.clone(), 0, 1, Some(3)), vec![0, 1, 2]);
        assert_eq!(
            pick(items, 0, 0, None).len(),
            30,
            "--every 0 means every item"
        );
    }
}
