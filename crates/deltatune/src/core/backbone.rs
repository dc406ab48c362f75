//! The [`Backbone`] trait: a frozen pre-trained model whose modules are [`Site`]s.

use super::delta::BackboneInfo;
use super::forward::{ForwardCtx, ModelOutput};
use super::site::Site;
use super::tree::ModuleTree;
use crate::data::tokenize::EncodedBatch;
use crate::error::Result;
use candle_core::{Device, Tensor};

/// A frozen pre-trained model whose modules are sites.
pub trait Backbone: Send + Sync {
    /// `model_type` from config.json.
    fn model_type(&self) -> &str;
    fn hidden_size(&self) -> usize;
    fn num_layers(&self) -> usize;
    fn device(&self) -> &Device;
    /// Sizes that delta methods need.
    fn info(&self) -> BackboneInfo;
    /// A content hash of the base weights and config, recorded in saved deltas.
    fn fingerprint(&self) -> &str;
    /// Runs the model on a tokenized batch.
    fn forward(&self, batch: &EncodedBatch, ctx: &ForwardCtx) -> Result<ModelOutput>;
    /// Runs the embeddings and the first `k` layers: hidden states (b, v + t, h), the 0/1 mask and
    /// the number of soft-prompt positions. With `output_hidden_states`, intermediate states are
    /// appended to `collected`.
    fn forward_until(&self, batch: &EncodedBatch, k: usize, ctx: &ForwardCtx, collected: &mut Vec<Tensor>) -> Result<(Tensor, Tensor, usize)>;
    /// Runs layers `k..` on hidden states from [`Backbone::forward_until`] (or a cache of them).
    fn forward_layers(&self, hidden: Tensor, mask: Tensor, num_virtual: usize, k: usize, ctx: &ForwardCtx, collected: Vec<Tensor>) -> Result<ModelOutput>;
    /// Every site in forward order.
    fn sites(&self) -> Vec<&Site>;
    fn sites_mut(&mut self) -> Vec<&mut Site>;
    /// The word embedding table (vocab, h), e.g. to initialise soft prompts from vocabulary.
    fn word_embeddings(&self) -> Result<Tensor>;

    fn site(&self, path: &str) -> Option<&Site> {
        self.sites().into_iter().find(|s| s.path() == path)
    }

    fn site_mut(&mut self, path: &str) -> Option<&mut Site> {
        self.sites_mut().into_iter().find(|s| s.path() == path)
    }

    /// Total number of base parameters.
    fn num_params(&self) -> usize {
        self.sites().iter().map(|s| s.num_params()).sum()
    }

    /// The module tree (paths, kinds, shapes, attached deltas) for display and matching.
    fn tree(&self) -> ModuleTree {
        ModuleTree::from_sites(self.model_type(), &self.sites())
    }
}

