//! The named benchmark tasks and where they live under a data root.

use super::source;
use super::{glue, sentences, superglue};
use crate::data::task::{TaskData, TaskOptions};
use crate::error::{Error, Result};
use std::path::Path;

type Loader = fn(&Path, &TaskOptions) -> Result<TaskData>;

/// A named task: its canonical name, other accepted names, and its folder under the data root.
struct TaskSpec {
    name: &'static str,
    aliases: &'static [&'static str],
    dir: &'static str,
    load: Loader,
}

const TASKS: &[TaskSpec] = &[
    TaskSpec { name: "sst2", aliases: &["sst-2", "glue/sst2"], dir: "glue/sst2", load: glue::sst2 },
    TaskSpec { name: "cola", aliases: &["glue/cola"], dir: "glue/cola", load: glue::cola },
    TaskSpec { name: "mrpc", aliases: &["glue/mrpc"], dir: "glue/mrpc", load: glue::mrpc },
    TaskSpec { name: "rte", aliases: &["glue/rte"], dir: "glue/rte", load: glue::rte },
    TaskSpec { name: "stsb", aliases: &["sts-b", "glue/stsb"], dir: "glue/stsb", load: glue::stsb },
    TaskSpec { name: "qnli", aliases: &["glue/qnli"], dir: "glue/qnli", load: glue::qnli },
    TaskSpec { name: "cb", aliases: &["superglue/cb"], dir: "superglue/cb", load: superglue::cb },
    TaskSpec { name: "superglue-rte", aliases: &["superglue/rte"], dir: "superglue/rte", load: superglue::rte },
    TaskSpec { name: "boolq", aliases: &["superglue/boolq"], dir: "superglue/boolq", load: superglue::boolq },
    TaskSpec { name: "copa", aliases: &["superglue/copa"], dir: "superglue/copa", load: superglue::copa },
    TaskSpec { name: "wic", aliases: &["superglue/wic"], dir: "superglue/wic", load: superglue::wic },
    TaskSpec { name: "trec", aliases: &[], dir: "trec", load: sentences::trec },
    TaskSpec { name: "mr", aliases: &[], dir: "mr", load: sentences::mr },
    TaskSpec { name: "cr", aliases: &[], dir: "cr", load: sentences::cr },
    TaskSpec { name: "subj", aliases: &[], dir: "subj", load: sentences::subj },
    TaskSpec { name: "mpqa", aliases: &[], dir: "mpqa", load: sentences::mpqa },
    TaskSpec { name: "sst5", aliases: &["sst-5"], dir: "sst5", load: sentences::sst5 },
];

/// The canonical names [`load_task`] accepts, in table order.
pub fn task_names() -> Vec<&'static str> {
    TASKS.iter().map(|t| t.name).collect()
}

/// The folder of a named task relative to the data root (`"glue/sst2"`), for messages and checks.
pub fn task_dir(name: &str) -> Option<&'static str> {
    find(name).map(|t| t.dir)
}

fn find(name: &str) -> Option<&'static TaskSpec> {
    let key = name.trim().to_ascii_lowercase();
    TASKS.iter().find(|t| t.name == key || t.aliases.contains(&key.as_str()))
}

/// Loads a named benchmark task from `root` (the shared `data` folder: `root/glue/sst2/...`).
///
/// Names are those of [`task_names`] (also `glue/sst2`-style paths and `sst-2`, `sts-b`, `sst-5`).
/// Splits that the data lacks are held out with `opts.seed` and described in
/// [`TaskData::notes`]; then `max_train`/`max_dev` keep the first N examples.
pub fn load_task(name: &str, root: &Path, opts: &TaskOptions) -> Result<TaskData> {
    opts.validate()?;
    let spec = find(name)
        .ok_or_else(|| Error::arg("task", format!("unknown task `{name}`; available: {}", task_names().join(", "))))?;
    let dir = root.join(spec.dir);
    if !dir.is_dir() {
        return Err(Error::NotFound { path: dir, what: format!("data folder of task `{}`", spec.name) });
    }
    let mut data = (spec.load)(&dir, opts)?;
    source::apply_limits(&mut data, opts);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_unknown_task() {
        assert_eq!(task_dir("SST-2"), Some("glue/sst2"));
        assert_eq!(task_dir("superglue/rte"), Some("superglue/rte"));
        assert_eq!(task_dir("rte"), Some("glue/rte"));
        let err = load_task("mnli", Path::new("."), &TaskOptions::default()).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid task: unknown task `mnli`; available: sst2, cola, mrpc, rte, stsb, qnli, cb, superglue-rte, \
             boolq, copa, wic, trec, mr, cr, subj, mpqa, sst5"
        );
        let d = tempfile::tempdir().unwrap();
        let err = load_task("cr", d.path(), &TaskOptions::default()).unwrap_err().to_string();
        assert!(err.ends_with("cr: data folder of task `cr` not found"), "{err}");
    }
}
