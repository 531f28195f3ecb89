//! Generates the gRPC code for `proto/` with the pure-Rust `protox` compiler, so a
//! fresh machine needs no system `protoc`, and keeps the encoded descriptor set
//! for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/convo/v1/convo.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `embed_migrations!` cannot see new migration files by itself.
    println!("cargo:rerun-if-changed=migrations");

    let descriptors = protox::compile([PROTO], ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("convo_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)?;
    Ok(())
}
