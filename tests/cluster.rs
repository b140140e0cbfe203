//! Synonym clusters on the real model: the model's proposals and the
//! embedding filter that keeps a cluster about its attribute.

mod common;

use imprint::learn::cluster::{self, SynonymFilter};
use imprint::profile::Polarity;

/// The filter, measured on the hand-written lexicon: each attribute's own
/// synonyms must pass far more often than other attributes' synonyms.
#[test]
fn the_filter_prefers_an_attributes_own_synonyms() {
    let engine = common::engine();
    let filter = SynonymFilter::new(&engine).unwrap();
    let lexicon = cluster::lexicon();
    let (mut own, mut other) = (Vec::new(), Vec::new());
    for (attribute, members) in &lexicon {
        let mine: Vec<&str> = members
            .iter()
            .map(|m| m.attribute.as_str())
            .filter(|s| s != attribute)
            .collect();
        // One synonym of each other attribute.
        let theirs: Vec<&str> = lexicon
            .iter()
            .filter(|(o, _)| o != attribute)
            .filter_map(|(o, ms)| ms.iter().map(|m| m.attribute.as_str()).find(|s| s != o))
            .collect();
        own.extend(filter.ranks(&engine, attribute, &mine).unwrap());
        other.extend(filter.ranks(&engine, attribute, &theirs).unwrap());
    }
    let share = |v: &[f64], t: f64| v.iter().filter(|&&r| r >= t).count() as f64 / v.len() as f64;
    for t in [0.5, 0.75, 0.85, 0.9, 0.95] {
        println!(
            "rank ≥ {t}: own synonyms kept {:.1} % of {}, other attributes' {:.1} % of {}",
            share(&own, t) * 100.0,
            own.len(),
            share(&other, t) * 100.0,
            other.len()
        );
    }
    let t = filter.min_rank;
    assert!(
        share(&own, t) > 2.0 * share(&other, t),
        "at the default rank {t}: own {:.3} vs other {:.3}",
        share(&own, t),
        share(&other, t)
    );
}

/// An attribute the lexicon lacks gets a k-member cluster: the plain
/// template question first, each member's question containing its synonym,
/// no repeats; and the same attribute gets the same cluster again.
#[test]
fn the_model_refines_a_template_cluster() {
    let mut engine = common::engine();
    for attribute in ["favorite board game", "coffee order"] {
        let refined =
            cluster::refine_with_model(&mut engine, attribute, Polarity::Like, 3).unwrap();
        println!(
            "{attribute}: proposed {:?}, kept {:?}",
            refined.proposed, refined.kept
        );
        let c = &refined.cluster;
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(c[0], cluster::build(attribute, Polarity::Like, 1)[0]);
        for m in c {
            assert!(m.question.contains(&m.attribute), "{m:?}");
        }
        let distinct: std::collections::HashSet<_> = c.iter().map(|m| &m.question).collect();
        assert_eq!(distinct.len(), 3, "{c:?}");
        for kept in &refined.kept {
            assert!(refined.proposed.contains(kept));
            assert!(c.iter().any(|m| &m.attribute == kept));
        }
        let again = cluster::refine_with_model(&mut engine, attribute, Polarity::Like, 3).unwrap();
        assert_eq!(&again.cluster, c, "greedy proposals are reproducible");
    }
}
