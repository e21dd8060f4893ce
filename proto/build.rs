//! Compiles proto/warden/v1/*.proto with protox (pure Rust; no protoc on the
//! build machine) and generates the tonic client and server code. The
//! encoded descriptor set is kept for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "warden/v1/workers.proto",
        "warden/v1/profiles.proto",
        "warden/v1/events.proto",
        "warden/v1/usage.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("warden_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // prost's codec, with requests' repeated fields bounded (src/codec.rs).
        .codec_path("crate::codec::Bounded")
        .compile_fds(fds)?;
    Ok(())
}
