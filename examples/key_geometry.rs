//! Diagnostic: at which layer does the answer position tell one preference's
//! questions from another's?
//!
//! An FT-M edit acts on the MLP keys at its layer; the first answer token is
//! read at the prompt's last position. A paraphrase can only reach an edit
//! whose training keys it resembles, and another preference's questions stay
//! clear of it only if they resemble it less. For every layer this prints,
//! over UPQA items (one per attribute type), how often the paraphrased and
//! the implicit question's last-position key is nearest (centred cosine) to
//! its *own* item's training keys among all items' — 10 % is chance with ten
//! items.
//!
//! cargo run --release --example key_geometry -- MODEL.gguf \
//!     ../shared/data/upqa/balanced_subset.json ../shared/data/upqa/balanced_subset_cluster9.json [k] [verbatim]

use std::path::PathBuf;

use imprint::editor::model::{Batch, LlamaModel};
use imprint::engine::{ChatMessage, Engine, EngineOptions};
use imprint::eval::upqa_data::{first_person, load_clusters, load_items};

const SYSTEM: &str = "You are a helpful personal assistant. Answer briefly and directly.";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_path, data, clusters, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: key_geometry MODEL.gguf DATA.json CLUSTERS.json [k] [verbatim]");
    };
    let k: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(3);
    // "verbatim": the cluster questions as UPQA words them ("What's your …").
    let verbatim = rest.get(1).is_some_and(|s| s == "verbatim");
    let items = load_items(&PathBuf::from(data))?;
    let clusters = load_clusters(&PathBuf::from(clusters), &PathBuf::from(data), items.len())?;
    let mut options = EngineOptions::new(PathBuf::from(model_path));
    options.n_gpu_layers = 0;
    let engine = Engine::load(options)?;
    let model = LlamaModel::load(&PathBuf::from(model_path))?;
    let tokens = |q: &str| -> anyhow::Result<Vec<u32>> {
        let text = engine.render(&[ChatMessage::system(SYSTEM), ChatMessage::user(q)])?;
        Ok(engine.tokenize(&text).iter().map(|t| t.0 as u32).collect())
    };
    // One item per attribute type (balanced_subset lists ten of each in a row).
    let picked: Vec<usize> = (0..items.len()).step_by(10).collect();
    // (item, role) per sequence: role 0 = training, 1 = paraphrased, 2 = implicit.
    let mut seqs = Vec::new();
    let mut owner = Vec::new();
    for (n, &i) in picked.iter().enumerate() {
        for q in clusters[i].questions(k) {
            seqs.push(tokens(&if verbatim { q } else { first_person(&q) })?);
            owner.push((n, 0));
        }
        seqs.push(tokens(&items[i].question_paraphrased)?);
        owner.push((n, 1));
        seqs.push(tokens(&items[i].implicit_question)?);
        owner.push((n, 2));
    }
    println!(
        "layer | paraphrase nearest own | implicit nearest own | paraphrase own rank (mean, of {})",
        picked.len()
    );
    for layer in 0..model.config.n_layer {
        let batch = Batch::new(seqs.clone());
        let prefix = model.prefix(&batch, layer)?;
        let width = prefix.width;
        let keys = prefix
            .keys
            .reshape((seqs.len() * width, model.config.n_ff))?
            .to_vec2::<f32>()?;
        let shared = prefix.shared_len;
        let last: Vec<Vec<f64>> = seqs
            .iter()
            .enumerate()
            .map(|(b, s)| {
                keys[b * width + s.len() - 1 - shared]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect()
            })
            .collect();
        let dim = last[0].len();
        let mut centre = vec![0.0; dim];
        for v in &last {
            for (c, x) in centre.iter_mut().zip(v) {
                *c += x / last.len() as f64;
            }
        }
        let centred: Vec<Vec<f64>> = last
            .iter()
            .map(|v| v.iter().zip(&centre).map(|(a, c)| a - c).collect())
            .collect();
        let cos = |a: &[f64], b: &[f64]| {
            let d: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            d / (n(a) * n(b)).max(1e-12)
        };
        let train_mean: Vec<Vec<f64>> = (0..picked.len())
            .map(|n| {
                let rows: Vec<&Vec<f64>> = centred
                    .iter()
                    .zip(&owner)
                    .filter(|(_, o)| **o == (n, 0))
                    .map(|(v, _)| v)
                    .collect();
                (0..dim)
                    .map(|d| rows.iter().map(|r| r[d]).sum::<f64>() / rows.len() as f64)
                    .collect()
            })
            .collect();
        let mut nearest = [0usize; 3];
        let mut rank_sum = 0usize;
        for (v, &(n, role)) in centred.iter().zip(&owner) {
            if role == 0 {
                continue;
            }
            let own = cos(v, &train_mean[n]);
            let better = train_mean.iter().filter(|t| cos(v, t) > own).count();
            if better == 0 {
                nearest[role] += 1;
            }
            if role == 1 {
                rank_sum += better + 1;
            }
        }
        println!(
            "{layer:>5} | {:>2}/{} | {:>2}/{} | {:.1}",
            nearest[1],
            picked.len(),
            nearest[2],
            picked.len(),
            rank_sum as f64 / picked.len() as f64
        );
    }
    Ok(())
}
