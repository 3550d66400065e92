//! A minimal model runner for rotq's end-to-end evaluation (`rotq eval --model`): it reads a
//! GGUF file, tokenizes text with the file's own vocabulary, and runs the llama forward pass
//! on the CPU with every layer's attention going through [`rotq::cache::RotatedKvCache`],
//! exactly as an engine would call it. It is a tool, not part of the engine library: an engine
//! that depends on `rotq` compiles none of it.

pub mod gguf;
pub mod tokenizer;
