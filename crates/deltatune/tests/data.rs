//! Data readers: every named task present under `../shared/data` loads with the example counts
//! and label balance of the data README / MANIFEST.tsv files (skipped with a printed reason when
//! the shared data is absent), and bad user input gives exact errors.

use crate::common::shared_dir;
use deltatune::data::readers::{load_folder, load_task, load_user, read_user_split, Columns, UserOptions};
use deltatune::data::{Label, LabelMap, MetricKind, TaskData, TaskKind, TaskOptions};
use std::path::{Path, PathBuf};

/// `../shared/data`, or `None` with a printed reason.
fn data_root() -> Option<PathBuf> {
    let root = shared_dir().map(|d| d.join("data")).filter(|p| p.is_dir());
    if root.is_none() {
        eprintln!("SKIP: ../shared/data not found (set DELTATUNE_SHARED to the shared folder to run these)");
    }
    root
}

/// Loads a named task, or `None` (printed) when its folder is absent.
fn load(root: &Path, name: &str, opts: &TaskOptions) -> Option<TaskData> {
    let dir = deltatune::data::readers::task_dir(name).map(|d| root.join(d))?;
    if !dir.is_dir() {
        eprintln!("SKIP {name}: {} not found", dir.display());
        return None;
    }
    Some(load_task(name, root, opts).unwrap_or_else(|e| panic!("loading {name}: {e}")))
}

struct Expect {
    name: &'static str,
    train: usize,
    dev: usize,
    test: Option<usize>,
    labels: Option<&'static [&'static str]>,
    first_metric: MetricKind,
}

/// Counts from the shared data README (train / dev / labelled test), with the held-out splits
/// this crate makes (10% by default, rounded): MRPC 408 of 4,076; TREC 545 of 5,452; MR 1,066 +
/// 1,066 of 10,662; CR 377 + 377 of 3,771; SUBJ 1,000 + 1,000 of 10,000; MPQA 1,060 + 1,060 of 10,603.
const EXPECTED: &[Expect] = &[
    Expect {
        name: "sst2",
        train: 67_349,
        dev: 872,
        test: None,
        labels: Some(&["0", "1"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "cola",
        train: 8_551,
        dev: 1_043,
        test: None,
        labels: Some(&["0", "1"]),
        first_metric: MetricKind::Matthews,
    },
    Expect {
        name: "mrpc",
        train: 3_668,
        dev: 408,
        test: Some(1_725),
        labels: Some(&["0", "1"]),
        first_metric: MetricKind::F1,
    },
    Expect {
        name: "rte",
        train: 2_490,
        dev: 277,
        test: None,
        labels: Some(&["entailment", "not_entailment"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect { name: "stsb", train: 5_749, dev: 1_500, test: None, labels: None, first_metric: MetricKind::Pearson },
    Expect {
        name: "cb",
        train: 250,
        dev: 56,
        test: None,
        labels: Some(&["entailment", "contradiction", "neutral"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "superglue-rte",
        train: 2_490,
        dev: 277,
        test: None,
        labels: Some(&["entailment", "not_entailment"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "trec",
        train: 4_907,
        dev: 545,
        test: Some(500),
        labels: Some(&["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "mr",
        train: 8_530,
        dev: 1_066,
        test: Some(1_066),
        labels: Some(&["0", "1"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "cr",
        train: 3_017,
        dev: 377,
        test: Some(377),
        labels: Some(&["0", "1"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "subj",
        train: 8_000,
        dev: 1_000,
        test: Some(1_000),
        labels: Some(&["0", "1"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "mpqa",
        train: 8_483,
        dev: 1_060,
        test: Some(1_060),
        labels: Some(&["0", "1"]),
        first_metric: MetricKind::Accuracy,
    },
    Expect {
        name: "sst5",
        train: 8_544,
        dev: 1_101,
        test: Some(2_210),
        labels: Some(&["0", "1", "2", "3", "4"]),
        first_metric: MetricKind::Accuracy,
    },
];

#[test]
fn named_tasks_have_the_readme_counts() {
    let Some(root) = data_root() else { return };
    for e in EXPECTED {
        let Some(t) = load(&root, e.name, &TaskOptions::default()) else { continue };
        let test = t.test.as_ref().map(Vec::len);
        eprintln!("{}: train {} dev {} test {:?}", e.name, t.train.len(), t.dev.len(), test);
        assert_eq!((t.train.len(), t.dev.len(), test), (e.train, e.dev, e.test), "{}", e.name);
        let names: Option<Vec<&str>> = t.labels.as_ref().map(|m| m.names().iter().map(String::as_str).collect());
        assert_eq!(names.as_deref(), e.labels, "{}", e.name);
        assert_eq!(t.metrics.first(), Some(&e.first_metric), "{}", e.name);
        let all = t.train.iter().chain(&t.dev).chain(t.test.iter().flatten());
        assert!(all.clone().all(|x| !x.text_a.is_empty()), "{}: empty text", e.name);
        match t.kind {
            TaskKind::Classification { num_labels } => {
                assert!(all.clone().all(|x| matches!(x.label, Label::Class(c) if c < num_labels)), "{}", e.name)
            }
            TaskKind::Regression => {
                assert!(all.clone().all(|x| matches!(x.label, Label::Real(v) if (0.0..=5.0).contains(&v))))
            }
        }
    }
}

#[test]
fn label_balance_matches_the_manifests() {
    let Some(root) = data_root() else { return };
    let sum = |a: Vec<usize>, b: Vec<usize>| a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>();
    if let Some(t) = load(&root, "sst2", &TaskOptions::default()) {
        assert_eq!(t.class_counts(&t.train), [29_780, 37_569]);
        assert_eq!(t.class_counts(&t.dev), [428, 444]);
    }
    if let Some(t) = load(&root, "cola", &TaskOptions::default()) {
        assert_eq!(t.class_counts(&t.train), [2_528, 6_023]);
        assert_eq!(t.class_counts(&t.dev), [162 + 162, 365 + 354]);
    }
    if let Some(t) = load(&root, "mrpc", &TaskOptions::default()) {
        assert_eq!(sum(t.class_counts(&t.train), t.class_counts(&t.dev)), [1_323, 2_753]);
        assert_eq!(t.class_counts(t.test.as_deref().unwrap_or_default()), [578, 1_147]);
    }
    if let Some(t) = load(&root, "rte", &TaskOptions::default()) {
        assert_eq!(t.class_counts(&t.train), [1_249, 1_241]);
    }
    if let Some(t) = load(&root, "cb", &TaskOptions::default()) {
        // entailment, contradiction, neutral
        assert_eq!(t.class_counts(&t.train), [115, 119, 16]);
        assert_eq!(t.class_counts(&t.dev), [23, 28, 5]);
    }
    if let Some(t) = load(&root, "trec", &TaskOptions::default()) {
        assert_eq!(sum(t.class_counts(&t.train), t.class_counts(&t.dev)), [86, 1_162, 1_250, 1_223, 835, 896]);
        assert_eq!(t.class_counts(t.test.as_deref().unwrap_or_default()), [9, 138, 94, 65, 81, 113]);
        // TREC.train is Latin-1: byte 0xF0 ("sister\xF0city") decodes to U+00F0.
        assert!(t.train.iter().chain(&t.dev).any(|x| x.text_a.contains("sister\u{f0}city")));
    }
    if let Some(t) = load(&root, "sst5", &TaskOptions::default()) {
        assert_eq!(t.class_counts(&t.train), [1_092, 2_218, 1_624, 2_322, 1_288]);
    }
    if let Some(t) = load(&root, "mpqa", &TaskOptions::default()) {
        let all = [t.train.as_slice(), &t.dev, t.test.as_deref().unwrap_or_default()].concat();
        assert_eq!(t.class_counts(&all), [7_292, 3_311]);
    }
}

#[test]
fn pairs_texts_and_first_lines() {
    let Some(root) = data_root() else { return };
    if let Some(t) = load(&root, "sst2", &TaskOptions::default()) {
        // Trailing spaces of SST-2 sentences are stripped.
        assert_eq!(t.train[0].text_a, "hide new secretions from the parental units");
        assert_eq!(t.train[0].label, Label::Class(0));
        assert!(t.train.iter().all(|x| x.text_b.is_none()));
    }
    if let Some(t) = load(&root, "rte", &TaskOptions::default()) {
        assert_eq!(t.train[0].text_b.as_deref(), Some("Weapons of Mass Destruction Found in Iraq."));
        assert_eq!(t.train[0].label, Label::Class(1));
    }
    if let Some(t) = load(&root, "stsb", &TaskOptions::default()) {
        assert_eq!(t.kind, TaskKind::Regression);
        assert_eq!(t.train[0].text_a, "A plane is taking off.");
        assert_eq!(t.train[0].label, Label::Real(5.0));
    }
}

#[test]
fn seeded_splits_and_limits_are_deterministic() {
    let Some(root) = data_root() else { return };
    let Some(a) = load(&root, "mrpc", &TaskOptions::default()) else { return };
    let b = load(&root, "mrpc", &TaskOptions::default()).unwrap_or_else(|| unreachable!());
    assert_eq!(a.dev, b.dev);
    assert!(a.notes.iter().any(|n| n.contains("408 of the 4,076 pairs") && n.contains("seed 42")), "{:?}", a.notes);
    let c = load(&root, "mrpc", &TaskOptions { seed: 7, ..Default::default() }).unwrap_or_else(|| unreachable!());
    assert_ne!(a.dev, c.dev);
    assert_eq!(c.dev.len(), 408);

    let Some(full) = load(&root, "sst2", &TaskOptions::default()) else { return };
    let opts = TaskOptions { max_train: Some(8_000), max_dev: Some(100), ..Default::default() };
    let small = load(&root, "sst2", &opts).unwrap_or_else(|| unreachable!());
    assert_eq!(small.train.as_slice(), &full.train[..8_000]);
    assert_eq!(small.dev.as_slice(), &full.dev[..100]);
    assert!(small.notes.iter().any(|n| n == "train: first 8,000 of 67,349 examples kept"), "{:?}", small.notes);
}

#[test]
fn tasks_without_a_train_split_or_unsupported() {
    let Some(root) = data_root() else { return };
    let cases = [
        ("qnli", "glue/qnli/train.tsv: no training split for QNLI: train.tsv is not part of the shared data"),
        (
            "boolq",
            "superglue/boolq/train.jsonl: no training split for BoolQ: train.jsonl is not part of the shared data",
        ),
        ("wic", "superglue/wic/train.jsonl: no training split for WiC: train.jsonl is not part of the shared data"),
        ("copa", "superglue/copa: COPA is not supported: it is a multiple-choice task"),
    ];
    for (name, expected) in cases {
        let dir = deltatune::data::readers::task_dir(name).map(|d| root.join(d));
        if !dir.is_some_and(|d| d.is_dir()) {
            eprintln!("SKIP {name}: not in the shared data");
            continue;
        }
        let err = load_task(name, &root, &TaskOptions::default()).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(expected), "{name}: {err}");
    }
}

// ---- user files: exact errors ----

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn cols(text: &str, label: &str) -> Columns {
    Columns { text: text.into(), text_pair: None, label: label.into() }
}

fn user_err(train: &Path, dev: Option<&Path>, c: &Columns, opts: &UserOptions) -> String {
    match load_user(train, dev, c, opts) {
        Ok(_) => panic!("loading {} should fail", train.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn user_csv_reads_quotes_and_holds_out_dev() {
    let d = tempfile::tempdir().unwrap();
    let mut body = String::from("id,text,label\n");
    for i in 0..30 {
        body.push_str(&format!("{i},\"text, number {i}\",{}\n", if i % 3 == 0 { "pos" } else { "neg" }));
    }
    let p = write(d.path(), "reviews.csv", body.as_bytes());
    let t = load_user(&p, None, &cols("text", "label"), &UserOptions::default()).unwrap();
    assert_eq!(t.name, "reviews");
    assert_eq!(t.labels.as_ref().unwrap().names(), ["neg", "pos"]);
    assert_eq!((t.train.len(), t.dev.len()), (27, 3));
    assert_eq!(t.metrics, [MetricKind::Accuracy, MetricKind::F1]);
    assert!(t.notes.contains(&"dev: 3 of the 30 training examples held out at random (seed 42, fraction 0.1)".into()));
    assert!(t.notes.contains(&"f1 is computed for the label \"pos\" (index 1)".into()));
    assert!(t.train[0].text_a.starts_with("text, number "));
}

#[test]
fn user_missing_column() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "train.csv", b"text,label\nhello,1\n");
    let err = user_err(&p, None, &cols("sentence", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}:1: no column `sentence`; available columns: text, label", p.display()));
}

#[test]
fn user_malformed_row() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "train.tsv", b"text\tlabel\na\t1\nb\t0\textra\n");
    let err = user_err(&p, None, &cols("text", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}:3: expected 2 tab-separated fields (as in the header), found 3", p.display()));
}

#[test]
fn user_unknown_and_unparsable_labels() {
    let d = tempfile::tempdir().unwrap();
    let train = write(d.path(), "train.csv", b"text,label\na,pos\nb,neg\nc,pos\n");
    let dev = write(d.path(), "dev.csv", b"text,label\nx,neg\ny,maybe\n");
    let err = user_err(&train, Some(&dev), &cols("text", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}:3:2: unknown label \"maybe\"; known labels: neg, pos", dev.display()));

    // At evaluation time, with the label map saved with a model.
    let opts = UserOptions { labels: Some(LabelMap::new(["neg", "pos"]).unwrap()), ..Default::default() };
    let err = read_user_split(&dev, &cols("text", "label"), &opts).unwrap_err().to_string();
    assert_eq!(err, format!("{}:3:2: unknown label \"maybe\"; known labels: neg, pos", dev.display()));
    let ok = read_user_split(&train, &cols("text", "label"), &opts).unwrap();
    assert_eq!(ok.examples[1].label, Label::Class(0));

    let scores = write(d.path(), "scores.jsonl", b"{\"s\": \"a\", \"y\": 0.5}\n{\"s\": \"b\", \"y\": \"high\"}\n");
    let opts = UserOptions { regression: true, ..Default::default() };
    let err = user_err(&scores, None, &cols("s", "y"), &opts);
    assert_eq!(err, format!("{}:2: cannot parse label \"high\" as a number", scores.display()));

    let one = write(d.path(), "one.csv", b"text,label\na,pos\nb,pos\n");
    let err = user_err(&one, None, &cols("text", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}: only one label (\"pos\") in the data; a classifier needs at least 2", one.display()));
}

#[test]
fn user_empty_split_and_missing_key() {
    let d = tempfile::tempdir().unwrap();
    let train = write(d.path(), "train.csv", b"text,label\na,1\nb,0\n");
    let dev = write(d.path(), "dev.csv", b"text,label\n");
    let err = user_err(&train, Some(&dev), &cols("text", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}: no examples", dev.display()));
    let empty = write(d.path(), "empty.tsv", b"");
    let err = user_err(&empty, None, &cols("text", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}: no examples (the file is empty)", empty.display()));
    let j = write(d.path(), "train.jsonl", b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n");
    let err = user_err(&j, None, &cols("text", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}:2: missing key `label`; keys present: text", j.display()));
    let blank = write(d.path(), "blank.csv", b"text,label\na,1\nb,\n");
    let err = user_err(&blank, None, &cols("text", "label"), &UserOptions::default());
    assert_eq!(err, format!("{}:3:2: empty label", blank.display()));
}

#[test]
fn user_non_utf8_is_kept_with_one_warning() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "train.tsv", b"text\tlabel\ncaf\xe9\t1\nok\t0\nna\xefve \xff\t1\nfine\t0\n");
    let t = load_user(&p, Some(&p), &cols("text", "label"), &UserOptions::default()).unwrap();
    assert_eq!(t.train.len(), 4);
    assert_eq!(t.train[0].text_a, "caf\u{fffd}");
    let warnings: Vec<&String> = t.notes.iter().filter(|n| n.contains("not valid UTF-8")).collect();
    // One warning per file read (train and dev are the same file here), counting lines.
    assert_eq!(warnings.len(), 2);
    assert_eq!(
        warnings[0],
        &format!(
            "{}: 2 lines not valid UTF-8, decoded with U+FFFD replacement characters (first: line 2)",
            p.display()
        )
    );
}

// ---- folder per class ----

#[test]
fn folder_per_class_sorted_seeded_and_lossy() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("news");
    for (class, n) in [("tech", 4), ("business", 5), ("sport", 6)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            std::fs::write(root.join(class).join(format!("{i:03}.txt")), format!("{class} story {i}\n\nbody\n"))
                .unwrap();
        }
    }
    std::fs::write(root.join("sport/.hidden"), "not an example").unwrap();
    std::fs::write(root.join(".marker"), "").unwrap();
    std::fs::write(root.join("sport/099.txt"), b"caf\xe9 story").unwrap();
    let t = load_folder(&root, &TaskOptions::default()).unwrap();
    assert_eq!(t.name, "news");
    assert_eq!(t.labels.as_ref().unwrap().names(), ["business", "sport", "tech"]);
    assert_eq!(t.kind, TaskKind::Classification { num_labels: 3 });
    assert_eq!(t.metrics, [MetricKind::Accuracy, MetricKind::MacroF1]);
    // 16 files, 10% -> 2 held out.
    assert_eq!((t.train.len(), t.dev.len()), (14, 2));
    let all: Vec<_> = t.train.iter().chain(&t.dev).cloned().collect();
    assert_eq!(t.class_counts(&all), [5, 7, 4]);
    assert!(all.iter().any(|x| x.text_a == "business story 0\n\nbody"));
    assert!(all.iter().any(|x| x.text_a == "caf\u{fffd} story"));
    assert!(t.notes.contains(&format!(
        "{}: 1 file not valid UTF-8, decoded with U+FFFD replacement characters (first: sport/099.txt)",
        root.display()
    )));
    let again = load_folder(&root, &TaskOptions::default()).unwrap();
    assert_eq!((again.train, again.dev), (t.train.clone(), t.dev.clone()));
    let other = load_folder(&root, &TaskOptions { seed: 3, ..Default::default() }).unwrap();
    assert_ne!(other.train, t.train);
    let limited = load_folder(&root, &TaskOptions { max_train: Some(5), ..Default::default() }).unwrap();
    assert_eq!(limited.train.as_slice(), &t.train[..5]);
}

/// The BBC News demo data (2,225 articles), when `deltatune setup` has installed it; never fetched
/// here.
#[test]
fn bbc_demo_data_when_installed() {
    use deltatune::assets::{home, installed_path, DEMO_DATA};
    let Some(dir) =
        home().ok().map(|h| installed_path(&h, &DEMO_DATA)).filter(|d| d.join(".deltatune-complete").is_file())
    else {
        eprintln!("SKIP: the BBC News demo data is not installed (run `deltatune setup`)");
        return;
    };
    let t = load_folder(&dir, &TaskOptions::default()).unwrap();
    let all: Vec<_> = t.train.iter().chain(&t.dev).cloned().collect();
    eprintln!(
        "bbc-news: train {} dev {} labels {:?}",
        t.train.len(),
        t.dev.len(),
        t.labels.as_ref().map(|m| m.names())
    );
    assert_eq!(all.len(), 2_225);
    assert_eq!(t.dev.len(), 223);
    assert_eq!(t.class_counts(&all), [510, 386, 417, 511, 401]);
    // One article (sports/199.txt) is not valid UTF-8.
    assert!(
        t.notes.iter().any(|n| n
            .ends_with("1 file not valid UTF-8, decoded with U+FFFD replacement characters (first: sports/199.txt)")),
        "{:?}",
        t.notes
    );
}
