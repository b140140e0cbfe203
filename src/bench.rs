//! `imprint bench decode`: prompt-processing and generation throughput,
//! measured the way llama.cpp's `llama-bench` measures them (a prompt of
//! `n_prompt` tokens decoded as one batch; `n_gen` tokens decoded one at a
//! time), so the two numbers can be compared directly.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::engine::{Engine, EngineError};

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Self {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeReport {
    pub model: String,
    pub threads: u32,
    pub n_gpu_layers: u32,
    pub adapter: Option<String>,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub runs: usize,
    pub prompt_tokens_per_s: Summary,
    pub generation_tokens_per_s: Summary,
}

pub fn decode(
    engine: &mut Engine,
    n_prompt: usize,
    n_gen: usize,
    runs: usize,
    mut on_run: impl FnMut(usize),
) -> Result<DecodeReport, EngineError> {
    // One untimed warm-up run, as llama-bench does.
    engine.bench_run(n_prompt.min(32), n_gen.min(4))?;
    let mut pp = Vec::with_capacity(runs);
    let mut tg = Vec::with_capacity(runs);
    for run in 0..runs {
        let (prompt_time, gen_time) = engine.bench_run(n_prompt, n_gen)?;
        pp.push(rate(n_prompt, prompt_time));
        tg.push(rate(n_gen, gen_time));
        on_run(run + 1);
    }
    Ok(report(engine, n_prompt, n_gen, &pp, &tg))
}

/// The engine's speed without and with an adapter, and their ratio.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterOverhead {
    pub base: DecodeReport,
    pub with_adapter: DecodeReport,
    /// Per round: generation speed with the adapter ÷ without.
    pub generation_ratio: Summary,
    /// Per round: prompt-processing speed with the adapter ÷ without.
    pub prompt_ratio: Summary,
}

/// [`decode`] without and with the adapter at `adapter`, in alternating
/// rounds (one run without, one with, `runs` times). Two blocks of runs
/// one after the other read the machine's drift as the adapter's cost: on
/// the shared 2-core VM the same binary measured 0.84× and 0.97× that way
/// (docs/RESULTS.md). Each round's ratio compares two runs made seconds
/// apart, and their median is the figure to report. The engine is left
/// with the adapter attached.
pub fn adapter_overhead(
    engine: &mut Engine,
    adapter: &Path,
    n_prompt: usize,
    n_gen: usize,
    runs: usize,
    mut on_run: impl FnMut(usize),
) -> Result<AdapterOverhead, EngineError> {
    let runs = runs.max(1);
    let (mut pp, mut tg) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for run in 0..runs {
        for (side, with) in [None, Some(adapter)].into_iter().enumerate() {
            // Attaching rebuilds the context: its first decode allocates
            // compute buffers, so each side gets its own warm-up.
            engine.set_adapter(with)?;
            engine.bench_run(n_prompt.min(32), n_gen.min(4))?;
            let (prompt_time, gen_time) = engine.bench_run(n_prompt, n_gen)?;
            pp[side].push(rate(n_prompt, prompt_time));
            tg[side].push(rate(n_gen, gen_time));
        }
        on_run(run + 1);
    }
    let ratios =
        |v: &[Vec<f64>; 2]| -> Vec<f64> { v[1].iter().zip(&v[0]).map(|(e, b)| e / b).collect() };
    let base = DecodeReport {
        adapter: None,
        ..report(engine, n_prompt, n_gen, &pp[0], &tg[0])
    };
    Ok(AdapterOverhead {
        base,
        with_adapter: report(engine, n_prompt, n_gen, &pp[1], &tg[1]),
        generation_ratio: Summary::of(&ratios(&tg)),
        prompt_ratio: Summary::of(&ratios(&pp)),
    })
}

fn report(engine: &Engine, n_prompt: usize, n_gen: usize, pp: &[f64], tg: &[f64]) -> DecodeReport {
    DecodeReport {
        model: engine.options().model_path.display().to_string(),
        threads: engine.options().resolved_threads(),
        n_gpu_layers: engine.options().n_gpu_layers,
        adapter: engine.adapter_path().map(|p| p.display().to_string()),
        n_prompt,
        n_gen,
        runs: tg.len(),
        prompt_tokens_per_s: Summary::of(pp),
        generation_tokens_per_s: Summary::of(tg),
    }
}

fn rate(tokens: usize, time: Duration) -> f64 {
    tokens as f64 / time.as_secs_f64().max(1e-9)
}

/// The process's peak resident set size (Linux: VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn summary_median_min_max() {
        let s = Summary::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert_eq!(Summary::of(&[4.0, 1.0, 9.0]).median, 4.0);
    }
}
