//! Text in: tokenization and batching. (Task readers, label maps and batching for training live
//! here too.)

pub mod batching;
pub mod lines;
pub mod tokenize;
