//! PNG charts of evaluation reports, in the paper's two figures: accuracy by
//! question type per method (grouped bars) and acknowledgment rate against
//! the number of distractor turns (one line per method).
//!
//! Charts are drawn from the reports' JSON, so one run's `report.json` gives
//! its own chart and several runs' reports give the comparison
//! (`imprint eval chart`). Text goes through `ab_glyph` with a font compiled
//! into the binary: no system font library (fontconfig) is needed, and the
//! same PNG comes out on every machine.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde_json::Value;

/// DejaVu Sans (Bitstream Vera licence, `assets/fonts/DejaVuSans.LICENSE`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 540);
/// Distinguishable colours for up to eight series (then they repeat).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("cannot draw {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("{path} is not an imprint eval report: {reason}")]
    NotAReport { path: PathBuf, reason: String },
    #[error("nothing to chart: {0}")]
    Empty(String),
}

/// One method's accuracy (0–1) per question type.
#[derive(Debug, Clone, PartialEq)]
pub struct AccuracySeries {
    pub label: String,
    /// (question type, accuracy).
    pub scores: Vec<(String, f64)>,
}

/// One method's acknowledgment rate (0–1) per number of distractor turns.
#[derive(Debug, Clone, PartialEq)]
pub struct AcknowledgmentSeries {
    pub label: String,
    pub points: Vec<(usize, f64)>,
}

/// What one report.json contributes.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportSeries {
    Accuracy(AccuracySeries),
    Acknowledgment(AcknowledgmentSeries),
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are compiled in and parsed by every test run; a failure
        // here would be a build defect, reported when text is drawn.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn draw_error(path: &Path) -> impl Fn(String) -> ChartError + '_ {
    move |message| ChartError::Draw {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads a `report.json` written by `imprint eval upqa` or `eval prefeval`.
pub fn series_from_report(path: &Path, json: &Value) -> Result<ReportSeries, ChartError> {
    let not_report = |reason: &str| ChartError::NotAReport {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let method = json
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| not_report("it has no \"method\""))?;
    if let Some(scores) = json.get("scores").and_then(Value::as_array) {
        let mut label = method.to_string();
        let edits = json.get("edits_accepted").is_some_and(|e| !e.is_null());
        if let Some(mode) = json.get("mode").and_then(Value::as_str).filter(|_| edits) {
            label.push_str(&format!(" ({mode}"));
            if let Some(k) = json.get("cluster_size").and_then(Value::as_u64) {
                label.push_str(&format!(", k={k}"));
            }
            label.push(')');
        }
        let scores = scores
            .iter()
            .map(|s| {
                let kind = s.get("kind").and_then(Value::as_str);
                let accuracy = s.get("accuracy").and_then(Value::as_f64);
                match (kind, accuracy) {
                    (Some(k), Some(a)) => Ok((k.to_string(), a)),
                    _ => Err(not_report("a score lacks \"kind\" or \"accuracy\"")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(ReportSeries::Accuracy(AccuracySeries { label, scores }));
    }
    if let Some(rates) = json.get("rates").and_then(Value::as_array) {
        let mut label = method.to_string();
        if let Some(on) = json.get("trained_on").and_then(Value::as_str) {
            label.push_str(&format!(" (trained on {on})"));
        }
        let points = rates
            .iter()
            .map(|r| {
                let turns = r.get("turns").and_then(Value::as_u64);
                let hits = r.get("acknowledged").and_then(Value::as_u64);
                let total = r.get("total").and_then(Value::as_u64);
                match (turns, hits, total) {
                    (Some(t), Some(h), Some(n)) => Ok((t as usize, h as f64 / n.max(1) as f64)),
                    _ => Err(not_report(
                        "a rate lacks \"turns\", \"acknowledged\" or \"total\"",
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(ReportSeries::Acknowledgment(AcknowledgmentSeries {
            label,
            points,
        }));
    }
    Err(not_report(
        "it has neither \"scores\" (eval upqa) nor \"rates\" (eval prefeval)",
    ))
}

type Chart<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;
type Root<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One chart: a white canvas with the title, x in `0..x_max`, y in 0–100 %;
/// `body` draws the mesh and the series, then the legend is drawn and the
/// PNG written.
fn draw(
    path: &Path,
    title: &str,
    x_max: f64,
    x_label_area: u32,
    body: impl FnOnce(&mut Chart<'_>, &Root<'_>) -> Result<(), String>,
) -> Result<(), ChartError> {
    let err = draw_error(path);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(x_label_area)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..100f64)
        .map_err(|e| err(e.to_string()))?;
    body(&mut chart, &root).map_err(&err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 15))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Grouped bars: one group per question type, one bar per series.
pub fn accuracy_chart(
    path: &Path,
    title: &str,
    series: &[AccuracySeries],
) -> Result<(), ChartError> {
    register_font();
    let mut kinds: Vec<String> = Vec::new();
    for s in series {
        for (k, _) in &s.scores {
            if !kinds.contains(k) {
                kinds.push(k.clone());
            }
        }
    }
    if kinds.is_empty() {
        return Err(ChartError::Empty("the reports hold no scores".into()));
    }
    draw(path, title, kinds.len() as f64, 36, |chart, root| {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .light_line_style(WHITE)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("correct answers (%)")
            .label_style((FAMILY, 15))
            .draw()
            .map_err(|e| e.to_string())?;
        // Bars fill 80 % of each group, side by side.
        let width = 0.8 / series.len().max(1) as f64;
        for (i, s) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let bars = s.scores.iter().filter_map(|(kind, accuracy)| {
                let group = kinds.iter().position(|k| k == kind)? as f64;
                let left = group + 0.1 + width * i as f64;
                Some(Rectangle::new(
                    [(left, 0.0), (left + width * 0.92, accuracy * 100.0)],
                    colour.filled(),
                ))
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled())
                });
        }
        // Group names under the axis, centred on each group.
        for (g, kind) in kinds.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
            let style = TextStyle::from((FAMILY, 16).into_font()).pos(
                plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                ),
            );
            root.draw(&Text::new(kind.clone(), (x, y + 8), style))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// Acknowledgment rate (%) against distractor turns, one line per series.
pub fn acknowledgment_chart(
    path: &Path,
    title: &str,
    series: &[AcknowledgmentSeries],
) -> Result<(), ChartError> {
    register_font();
    let max_turns = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .max()
        .ok_or_else(|| ChartError::Empty("the reports hold no rates".into()))?;
    draw(path, title, max_turns.max(1) as f64, 44, |chart, _| {
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_labels(max_turns.clamp(1, 12) + 1)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_desc("distractor turns before the question")
            .y_desc("acknowledged (%)")
            .label_style((FAMILY, 15))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let mut points: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|&(t, rate)| (t as f64, rate * 100.0))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))
                .map_err(|e| e.to_string())?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, colour.filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// The charts of several reports, written into `out`: `accuracy.png` when
/// any report is a UPQA one, `acknowledgment.png` when any is a PrefEval
/// one. Returns the files written.
pub fn chart_reports(reports: &[(PathBuf, Value)], out: &Path) -> Result<Vec<PathBuf>, ChartError> {
    let mut accuracy = Vec::new();
    let mut acknowledgment = Vec::new();
    for (path, json) in reports {
        match series_from_report(path, json)? {
            ReportSeries::Accuracy(s) => accuracy.push(s),
            ReportSeries::Acknowledgment(s) => acknowledgment.push(s),
        }
    }
    let mut written = Vec::new();
    if !accuracy.is_empty() {
        let path = out.join("accuracy.png");
        accuracy_chart(&path, "UPQA: accuracy by question type", &accuracy)?;
        written.push(path);
    }
    if !acknowledgment.is_empty() {
        let path = out.join("acknowledgment.png");
        acknowledgment_chart(
            &path,
            "PrefEval: acknowledgment vs distractor turns",
            &acknowledgment,
        )?;
        written.push(path);
    }
    if written.is_empty() {
        return Err(ChartError::Empty("no reports given".into()));
    }
    Ok(written)
}

/// The reports side by side as Markdown tables, one row per run: UPQA
/// accuracy (with edits accepted and the profile's locality when measured)
/// and PrefEval acknowledgment per turn count. `names` label the rows (the
/// run folders).
pub fn summary_markdown(reports: &[(String, Value)]) -> String {
    let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.1} %", v * 100.0));
    let mut upqa = Vec::new();
    let mut pref = Vec::new();
    for (name, json) in reports {
        if json.get("scores").is_some() {
            upqa.push((name, json));
        } else if json.get("rates").is_some() {
            pref.push((name, json));
        }
    }
    let mut md = String::new();
    if !upqa.is_empty() {
        md += "| run | method | mode, k | items | explicit | paraphrased | implicit | product | edits accepted | unrelated answers unchanged | their tokens | factual before → after | perplexity |\n";
        md += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
        for (name, j) in upqa {
            let score = |kind: &str| {
                j["scores"].as_array().and_then(|s| {
                    s.iter()
                        .find(|x| x["kind"] == kind)
                        .and_then(|x| x["accuracy"].as_f64())
                })
            };
            let items = j["items"].as_u64().unwrap_or(0);
            let accepted = j["edits_accepted"]
                .as_u64()
                .map_or("–".to_string(), |a| format!("{a}/{items}"));
            let loc = &j["locality"];
            let ratio = |a: &str, b: &str| match (loc[a].as_f64(), loc[b].as_f64()) {
                (Some(x), Some(n)) if n > 0.0 => Some(x / n),
                _ => None,
            };
            let factual = match (
                loc["knowledge_before"].as_u64(),
                loc["knowledge_after"].as_u64(),
            ) {
                (Some(b), Some(a)) => format!("{b} → {a}"),
                _ => "–".into(),
            };
            let ppl = match (
                loc["perplexity_before"].as_f64(),
                loc["perplexity_after"].as_f64(),
            ) {
                (Some(b), Some(a)) if b > 0.0 => format!("{:+.2} %", (a / b - 1.0) * 100.0),
                _ => "–".into(),
            };
            // Mode and cluster size only mean something for edit methods.
            let mode = match j["edits_accepted"].as_u64() {
                Some(_) => format!(
                    "{}, {}",
                    j["mode"].as_str().unwrap_or("?"),
                    j["cluster_size"].as_u64().unwrap_or(0)
                ),
                None => "–".into(),
            };
            md += &format!(
                "| {name} | {} | {mode} | {items} | {} | {} | {} | {} | {accepted} | {} | {} | {factual} | {ppl} |\n",
                j["method"].as_str().unwrap_or("?"),
                pct(score("explicit")),
                pct(score("paraphrased")),
                pct(score("implicit")),
                pct(score("product")),
                pct(ratio("unrelated_unchanged", "unrelated_total")),
                pct(ratio("tokens_same", "tokens_total")),
            );
        }
    }
    if !pref.is_empty() {
        let mut turns: Vec<u64> = pref
            .iter()
            .flat_map(|(_, j)| {
                j["rates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["turns"].as_u64())
            })
            .collect();
        turns.sort_unstable();
        turns.dedup();
        if !md.is_empty() {
            md += "\n";
        }
        md += "| run | method | items |";
        for t in &turns {
            md += &format!(" {t} turns |");
        }
        md += "\n| --- | --- | --- |";
        md += &" --- |".repeat(turns.len());
        md += "\n";
        for (name, j) in pref {
            md += &format!(
                "| {name} | {} | {} |",
                j["method"].as_str().unwrap_or("?"),
                j["items"].as_u64().unwrap_or(0)
            );
            for t in &turns {
                let cell = j["rates"]
                    .as_array()
                    .and_then(|r| r.iter().find(|r| r["turns"].as_u64() == Some(*t)))
                    .and_then(|r| Some((r["acknowledged"].as_u64()?, r["total"].as_u64()?)))
                    .map_or("–".to_string(), |(a, n)| {
                        format!("{a}/{n} ({:.0} %)", a as f64 * 100.0 / n.max(1) as f64)
                    });
                md += &format!(" {cell} |");
            }
            md += "\n";
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    /// Pixels of `colour` in the decoded image.
    fn count_colour(path: &Path, colour: RGBColor) -> usize {
        let img = image::open(path).unwrap().to_rgb8();
        img.pixels()
            .filter(|p| p.0 == [colour.0, colour.1, colour.2])
            .count()
    }

    fn upqa(method: &str, explicit: f64, implicit: f64) -> Value {
        let accepted = (method == "ftm").then_some(1);
        json!({"method": method, "mode": "sequential", "cluster_size": 3, "edits_accepted": accepted, "scores": [
            {"kind": "explicit", "accuracy": explicit, "f1": 0.0, "n": 10},
            {"kind": "implicit", "accuracy": implicit, "f1": 0.0, "n": 10},
        ]})
    }

    #[test]
    fn reports_are_read_into_labelled_series() {
        let s = series_from_report(Path::new("a.json"), &upqa("ftm", 0.5, 0.25)).unwrap();
        assert_eq!(
            s,
            ReportSeries::Accuracy(AccuracySeries {
                label: "ftm (sequential, k=3)".into(),
                scores: vec![("explicit".into(), 0.5), ("implicit".into(), 0.25)],
            })
        );
        let pref = json!({"method": "prompt", "rates": [
            {"turns": 0, "acknowledged": 3, "total": 4},
            {"turns": 2, "acknowledged": 1, "total": 4},
        ]});
        let s = series_from_report(Path::new("b.json"), &pref).unwrap();
        assert_eq!(
            s,
            ReportSeries::Acknowledgment(AcknowledgmentSeries {
                label: "prompt".into(),
                points: vec![(0, 0.75), (2, 0.25)],
            })
        );
    }

    #[test]
    fn foreign_json_is_refused_with_the_file_named() {
        let e = series_from_report(Path::new("x/report.json"), &json!({"method": "ftm"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x/report.json") && e.contains("scores"), "{e}");
        let e = series_from_report(Path::new("y.json"), &json!([1, 2]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("y.json") && e.contains("method"), "{e}");
        let bad = json!({"method": "ftm", "rates": [{"turns": 1}]});
        assert!(series_from_report(Path::new("z.json"), &bad).is_err());
    }

    #[test]
    fn summary_puts_each_run_on_a_row() {
        let none = upqa("none", 0.0, 0.0);
        let mut ftm = upqa("ftm", 0.5, 0.25);
        ftm["items"] = json!(10);
        ftm["edits_accepted"] = json!(7);
        ftm["locality"] = json!({"unrelated_unchanged": 50, "unrelated_total": 100,
            "tokens_same": 95, "tokens_total": 100, "knowledge_before": 58,
            "knowledge_after": 55, "perplexity_before": 20.0, "perplexity_after": 20.2});
        let pref = json!({"method": "prompt", "items": 4, "rates": [
            {"turns": 0, "acknowledged": 3, "total": 4},
            {"turns": 2, "acknowledged": 1, "total": 4},
        ]});
        let md = summary_markdown(&[("a".into(), ftm), ("b".into(), pref), ("c".into(), none)]);
        assert!(md.contains("| c | none | – |"), "{md}");
        assert!(md.contains("| a | ftm | sequential, 3 | 10 | 50.0 % | – | 25.0 % | – | 7/10 | 50.0 % | 95.0 % | 58 → 55 | +1.00 % |"), "{md}");
        assert!(
            md.contains("| b | prompt | 4 | 3/4 (75 %) | 1/4 (25 %) |"),
            "{md}"
        );
    }

    #[test]
    fn bar_heights_follow_the_scores() {
        let dir = tempfile::tempdir().unwrap();
        let reports = vec![
            (PathBuf::from("ftm.json"), upqa("ftm", 0.8, 0.1)),
            (PathBuf::from("none.json"), upqa("none", 0.2, 0.0)),
        ];
        let written = chart_reports(&reports, dir.path()).unwrap();
        assert_eq!(written, vec![dir.path().join("accuracy.png")]);
        assert_eq!(png_size(&written[0]), SIZE);
        // Bar area is proportional to accuracy: ftm (0.8 + 0.1) has 4.5× the
        // area of none (0.2 + 0.0), minus the legend swatches both share.
        let ftm = count_colour(&written[0], COLOURS[0]) as f64;
        let none = count_colour(&written[0], COLOURS[1]) as f64;
        assert!(none > 0.0, "the second series was not drawn");
        let ratio = ftm / none;
        assert!((3.5..5.0).contains(&ratio), "ftm/none pixel ratio {ratio}");
    }

    #[test]
    fn lines_are_drawn_per_method() {
        let dir = tempfile::tempdir().unwrap();
        let line = |method: &str, rates: &[(usize, u64)]| {
            let rates: Vec<Value> = rates
                .iter()
                .map(|&(t, a)| json!({"turns": t, "acknowledged": a, "total": 10}))
                .collect();
            json!({"method": method, "rates": rates})
        };
        let reports = vec![
            (PathBuf::from("a"), line("ftm", &[(0, 9), (2, 8), (4, 8)])),
            (
                PathBuf::from("b"),
                line("prompt", &[(0, 10), (2, 3), (4, 1)]),
            ),
        ];
        let written = chart_reports(&reports, dir.path()).unwrap();
        assert_eq!(written, vec![dir.path().join("acknowledgment.png")]);
        assert!(count_colour(&written[0], COLOURS[0]) > 100);
        assert!(count_colour(&written[0], COLOURS[1]) > 100);
        assert!(chart_reports(&[], dir.path()).is_err());
    }
}
