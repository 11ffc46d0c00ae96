//! With the `grpc` feature, generates the gRPC contract from `proto/relay/v1/*.proto` with
//! protox (a protobuf compiler in Rust), so no system `protoc` is needed. Without it, nothing.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    {
        println!("cargo:rerun-if-changed=proto");
        let fds = protox::compile(["relay/v1/billing.proto"], ["proto"])?;
        // The descriptor set, for the relay's gRPC reflection service.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(
            out.join("relay_v1_descriptor.bin"),
            prost::Message::encode_to_vec(&fds),
        )?;
        tonic_prost_build::configure()
            .build_server(true)
            .build_client(true)
            .build_transport(false)
            .compile_fds(fds)?;
    }
    Ok(())
}
