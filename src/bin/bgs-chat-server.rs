//! The reference Chat Server, built with the gateway so its tests find it.
fn main() -> std::process::ExitCode {
    bgs_chat_server::main()
}
