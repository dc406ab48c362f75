//! `deltatune inspect`: the module tree with parameter counts.

use crate::args::InspectArgs;
use anyhow::Result;
use deltatune::{Backbone, BertModel, Device};

pub fn run(a: InspectArgs) -> Result<()> {
    let dir = super::model_dir(&a.model)?;
    let model = BertModel::load(&dir, &Device::Cpu)?;
    let tree = model.tree();
    if a.json {
        println!("{}", serde_json::to_string(&tree)?);
    } else {
        print!("{}", tree.render());
    }
    Ok(())
}
