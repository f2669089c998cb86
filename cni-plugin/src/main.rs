//! The `weir-cni` binary: see the crate docs (`weir_cni_plugin`) and docs/cni.md.
use std::io::Write;

fn main() {
    // A panic is a bug; the runtime still gets a spec error object instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("weir-cni internal error (please report): {info}");
        let obj = serde_json::json!({
            "cniVersion": weir_cni_plugin::version::NEWEST,
            "code": weir_cni_plugin::error::code::INTERNAL,
            "msg": msg,
        });
        let _ = writeln!(std::io::stdout(), "{obj}");
        std::process::exit(1);
    }));
    if std::env::var_os("CNI_COMMAND").is_none() && std::env::args().len() > 1 {
        eprintln!("{}", weir_cni_plugin::usage());
    }
    let code = weir_cni_plugin::run(std::io::stdin().lock(), std::io::stdout().lock(), |k| {
        std::env::var(k).ok()
    });
    std::process::exit(code);
}
