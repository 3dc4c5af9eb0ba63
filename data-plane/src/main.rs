//! `claw-data-plane`: the OpenAI-compatible proxy (built in the data-plane issue).

fn main() {
    eprintln!("claw-data-plane: not implemented yet");
    std::process::exit(2);
}
