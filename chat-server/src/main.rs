fn main() -> std::process::ExitCode {
    bgs_chat_server::main()
}
