//! The `stackwarden` binary: everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    stackwarden::cli::main()
}
