//! Generates the Rust types of `ether.v1.proto` (the `ether.v1.proto` subprotocol) with
//! prost; the .proto is parsed by protox, so no `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=ether.v1.proto");
    let fds = protox::compile(["ether.v1.proto"], ["."])?;
    prost_build::Config::new().btree_map(["."]).compile_fds(fds)?;
    Ok(())
}
