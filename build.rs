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

    write_migration_scripts(&out_dir)?;

    // Maps as `BTreeMap`: the domain keeps metadata sorted, so a map moves
    // into a response as it is instead of being rehashed, and its entries go
    // out in key order, the same bytes for the same map.
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}

/// `migration_scripts.rs`: every migration's name with its up and down SQL,
/// for `store/migrations.rs` to run statement by statement.
fn write_migration_scripts(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("migrations");
    let mut names: Vec<String> = fs::read_dir(&root)?
        .filter_map(Result::ok)
        .filter(|entry| entry.path().join("up.sql").is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut code = String::from("&[\n");
    for name in names {
        let dir = root.join(&name);
        let down = dir.join("down.sql");
        let down = if down.is_file() {
            format!("Some(include_str!({:?}))", down.display().to_string())
        } else {
            "None".to_owned()
        };
        code += &format!(
            "    ({name:?}, include_str!({:?}), {down}),\n",
            dir.join("up.sql").display().to_string()
        );
    }
    code += "]\n";
    fs::write(out_dir.join("migration_scripts.rs"), code)?;
    Ok(())
}
