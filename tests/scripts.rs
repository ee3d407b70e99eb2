//! The scripts in `scripts/`: every one parses (shell with bash, Python with python3), and the helpers they share behave.

use std::path::Path;
use std::process::Command;

fn bash(script: &str) -> String {
    let out =
        Command::new("bash").arg("-c").arg(script).current_dir(env!("CARGO_MANIFEST_DIR")).output().expect("bash runs");
    assert!(out.status.success(), "bash failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_script_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir)
        .expect("scripts/ exists")
        .chain(std::fs::read_dir(dir.join("lib")).expect("scripts/lib exists"))
    {
        let path = entry.expect("readable entry").path();
        if path.is_file() {
            // Python helpers (the benchmarks' samplers) are compiled, the rest read by bash.
            let status = if path.extension().is_some_and(|e| e == "py") {
                let parse = "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])";
                Command::new("python3").args(["-c", parse]).arg(&path).status().expect("python3 runs")
            } else {
                Command::new("bash").arg("-n").arg(&path).status().expect("bash runs")
            };
            assert!(status.success(), "{} does not parse", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 6, "expected the scripts, found {checked}");
}

#[test]
fn cpu_lists_become_rps_masks() {
    let masks = bash(
        "source scripts/lib/steer-rx.sh; for l in 0 1 1,3 2-3 0,2-3; do printf '%s=%s\\n' \"$l\" \"$(cpu_mask $l)\"; done",
    );
    assert_eq!(masks, "0=1\n1=2\n1,3=a\n2-3=c\n0,2-3=d\n");
}

#[test]
fn receive_drops_are_summed_over_cores() {
    // Whatever this machine has dropped so far, as one decimal count.
    let drops = bash("source scripts/lib/steer-rx.sh; rx_drops");
    assert!(drops.trim().parse::<u64>().is_ok(), "not a count: {drops:?}");
}
