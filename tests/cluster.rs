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

struct Fixed;
impl imprint::profile::PassphraseSource for Fixed {
    fn passphrase(
        &self,
        _confirm: bool,
    ) -> Result<zeroize::Zeroizing<String>, imprint::profile::ProfileError> {
        Ok(zeroize::Zeroizing::new("cluster test".into()))
    }
}

/// An active "favorite …" preference with the given cluster, stated by hand.
fn add_liked(
    profile: &mut imprint::profile::Profile,
    attribute: &str,
    target: &str,
    cluster: &[imprint::profile::ClusterMember],
) -> i64 {
    use imprint::profile::{NewPreference, PreferenceStatus, SourceRef};
    profile
        .add_preference(&NewPreference {
            attribute: attribute.into(),
            target: target.into(),
            polarity: Polarity::Like,
            statement: format!("My {attribute} is {target}."),
            confidence: 1.0,
            status: PreferenceStatus::Active,
            source: SourceRef::Manual {
                note: "test".into(),
            },
            cluster: cluster.to_vec(),
        })
        .unwrap()
}

/// The edit job refines a template cluster before it trains: the stored
/// cluster becomes the refined one (audited) and the edit is trained on its
/// questions; with the switch off, it trains on the templates. (That lexicon clusters are left alone is the unit test
/// `only_template_clusters_are_refined`.)
#[test]
fn the_edit_job_trains_on_the_refined_cluster() {
    use imprint::learn::{queue_edit, run_edit_job, JobOptions, JobResult};
    use imprint::profile::{KeyChoice, Profile};
    let dir = tempfile::tempdir().unwrap();
    let (mut profile, _) = Profile::create(
        &imprint::paths::Paths::under(dir.path()),
        KeyChoice::Passphrase,
        &Fixed,
    )
    .unwrap();
    let model = common::model_path();
    let sha = imprint::models::registry::sha256_file(&model).unwrap();
    let mut engine = common::engine();
    let settings = imprint::editor::EditorSettings {
        retry: false,
        ..Default::default()
    };
    let cache = std::env::temp_dir().join("imprint-test-cache");
    let mut editor = imprint::editor::Editor::load(&model, &sha, &cache, settings).unwrap();

    // With `[learning] model_synonyms = false` the template cluster is
    // trained as it is and never rewritten.
    let kept_attribute = "favorite card game";
    let kept_template = cluster::build(kept_attribute, Polarity::Like, 3);
    let kept_id = add_liked(&mut profile, kept_attribute, "Cribbage", &kept_template);
    let job_id = queue_edit(&profile, kept_id, &sha).unwrap();
    let job = profile.claim_job_id(job_id).unwrap().unwrap();
    let off = JobOptions {
        model_synonyms: false,
    };
    let result = run_edit_job(&mut profile, &mut engine, &mut editor, &job, &off, |_| {}).unwrap();
    let JobResult::Edited(outcome) = result else {
        panic!("the job was skipped");
    };
    assert_eq!(profile.preference(kept_id).unwrap().cluster, kept_template);
    let template_questions: Vec<String> =
        kept_template.iter().map(|m| m.question.clone()).collect();
    assert_eq!(outcome.edit.request.questions, template_questions);

    let attribute = "favorite board game";
    let template = cluster::build(attribute, Polarity::Like, 3);
    let id = add_liked(&mut profile, attribute, "Carcassonne", &template);
    let expected = cluster::refine_with_model(&mut engine, attribute, Polarity::Like, 3)
        .unwrap()
        .cluster;

    let job_id = queue_edit(&profile, id, &sha).unwrap();
    let job = profile.claim_job_id(job_id).unwrap().unwrap();
    let options = JobOptions::default();
    let result = run_edit_job(
        &mut profile,
        &mut engine,
        &mut editor,
        &job,
        &options,
        |_| {},
    )
    .unwrap();
    let JobResult::Edited(outcome) = result else {
        panic!("the job was skipped");
    };
    let stored = profile.preference(id).unwrap();
    assert_eq!(stored.cluster, expected);
    let questions: Vec<String> = stored.cluster.iter().map(|m| m.question.clone()).collect();
    assert_eq!(
        outcome.edit.request.questions, questions,
        "trained on the stored cluster"
    );
    let changed = expected != template;
    assert_eq!(
        cluster::is_template_cluster(&stored),
        !changed,
        "a refined cluster is never refined again"
    );
    let log = profile.audit_log(50).unwrap();
    let clustered = log
        .iter()
        .filter(|e| e.action == "edited" && e.detail.starts_with("cluster: "))
        .count();
    assert_eq!(clustered, changed as usize, "{log:?}");
}
