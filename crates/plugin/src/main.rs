fn main() {
    std::process::exit(evio_plugin::main());
}
