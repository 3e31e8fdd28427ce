//! Seeded fuzzing of the desired-state loader: thousands of random
//! mutations of the shipped files (bytes, lines, YAML structure, hostile
//! values), each of which must load or be refused with errors that name the
//! file and a real line, never panic, and end promptly. A failure prints the
//! seed; `FUZZ_SEED=<n> cargo test --test fuzz_loader` replays it alone.

mod common;

use std::time::Duration;

use common::Workspace;
use rand::{Rng, SeedableRng, rngs::StdRng};
use stackwarden::spec;

const CASES: u64 = 2000;

/// Far beyond any real load (a few milliseconds): only a hang or a
/// blow-up (an alias bomb expanded, an unbounded read) gets near it.
const HANG: Duration = Duration::from_secs(10);

/// Fragments a careless or hostile editor might put anywhere.
const FRAGMENTS: &[&str] = &[
    "\u{feff}",
    "---\n",
    "...\n",
    "&a [x, x, x, x, x, x, x, x]\n",
    "[*a, *a, *a, *a, *a, *a, *a, *a]",
    "*undefined",
    "!!binary aGVsbG8=",
    "!Ref X",
    "{output: network.VpcId}",
    "{output: nowhere.Nothing}",
    "{output: .}",
    "500000000000y",
    "0s",
    "-1",
    "1e400",
    "forty-five",
    "~",
    "null",
    "''",
    "\"\\u0000\"",
    "[]",
    "{}",
    "? complex\n: key\n",
    "<<: *a\n",
    "\t",
    "../../../../../../etc/passwd",
    "/dev/zero",
    "/proc/self/environ",
    "templates/network.yaml",
    "stackwarden:revision",
    "aws:cloudformation:stack-name",
    "\u{1F600}",
    "\r\n",
    "\n  ",
    ": ",
    "- ",
    "#",
    "'",
    "\"",
    "|\n",
    ">-\n",
    "depends_on: [service]",
    "prune: true",
    "mode: observe",
    "allow_replacement: [dynamodb.Table]",
];

fn mutate(text: &str, rng: &mut StdRng) -> String {
    let mut out = text.to_owned();
    for _ in 0..rng.gen_range(1..=4) {
        let lines: Vec<&str> = out.lines().collect();
        let n = lines.len().max(1);
        out = match rng.gen_range(0..8) {
            // Flip, insert or delete a byte.
            0 => {
                let mut bytes = out.into_bytes();
                if !bytes.is_empty() {
                    let i = rng.gen_range(0..bytes.len());
                    match rng.gen_range(0..3) {
                        0 => bytes[i] ^= 1 << rng.gen_range(0..8),
                        1 => bytes.insert(i, rng.r#gen()),
                        _ => {
                            bytes.remove(i);
                        }
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            // Delete, duplicate or swap lines.
            1 => {
                let i = rng.gen_range(0..n);
                let mut l = lines.clone();
                if i < l.len() {
                    l.remove(i);
                }
                l.join("\n") + "\n"
            }
            2 => {
                let i = rng.gen_range(0..n);
                let mut l = lines.clone();
                if i < l.len() {
                    l.insert(i, lines[i]);
                }
                l.join("\n") + "\n"
            }
            3 => {
                let (i, j) = (rng.gen_range(0..n), rng.gen_range(0..n));
                let mut l = lines.clone();
                if i < l.len() && j < l.len() {
                    l.swap(i, j);
                }
                l.join("\n") + "\n"
            }
            // Replace a value after a colon with a fragment.
            4 => {
                let i = rng.gen_range(0..n);
                let frag = FRAGMENTS[rng.gen_range(0..FRAGMENTS.len())];
                lines
                    .iter()
                    .enumerate()
                    .map(|(k, l)| match l.split_once(": ") {
                        Some((key, _)) if k == i => format!("{key}: {frag}"),
                        _ => (*l).to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n"
            }
            // Insert a fragment anywhere.
            5 => {
                let frag = FRAGMENTS[rng.gen_range(0..FRAGMENTS.len())];
                let mut at = rng.gen_range(0..=out.len());
                while !out.is_char_boundary(at) {
                    at -= 1;
                }
                out.insert_str(at, frag);
                out
            }
            // Truncate.
            6 => {
                let mut at = rng.gen_range(0..=out.len());
                while !out.is_char_boundary(at) {
                    at -= 1;
                }
                out.truncate(at);
                out
            }
            // Re-indent a line.
            _ => {
                let i = rng.gen_range(0..n);
                let shift = rng.gen_range(0..4);
                lines
                    .iter()
                    .enumerate()
                    .map(|(k, l)| {
                        if k == i {
                            format!("{}{}", " ".repeat(shift), l.trim_start())
                        } else {
                            (*l).to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n"
            }
        };
    }
    out
}

#[test]
fn mutated_desired_state_never_panics_hangs_or_points_nowhere() {
    let ws = Workspace::new();
    let originals: Vec<(String, String)> = ["dev", "staging", "prod"]
        .iter()
        .map(|e| {
            let p = ws.path(&format!("desired-state/{e}.yaml"));
            (
                (*e).to_owned(),
                std::fs::read_to_string(p).expect("shipped file"),
            )
        })
        .collect();
    let seeds: Vec<u64> = match std::env::var("FUZZ_SEED") {
        Ok(s) => vec![s.parse().expect("FUZZ_SEED is a number")],
        Err(_) => (0..CASES).collect(),
    };
    let (mut loaded, mut refused) = (0, 0);
    let mut slowest = Duration::ZERO;
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let (env, original) = &originals[rng.gen_range(0..originals.len())];
        let text = mutate(original, &mut rng);
        let path = ws.path(&format!("desired-state/{env}.yaml"));
        std::fs::write(&path, &text).expect("write");
        let lines = text.lines().count().max(1);
        let started = std::time::SystemTime::now();
        let result = std::panic::catch_unwind(|| spec::load(&path));
        let took = started.elapsed().unwrap_or_default();
        slowest = slowest.max(took);
        assert!(took < HANG, "seed {seed}: loading took {took:?}\n{text}");
        match result {
            Err(_) => panic!("seed {seed}: the loader panicked on\n{text}"),
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(errors)) => {
                refused += 1;
                assert!(
                    !errors.0.is_empty(),
                    "seed {seed}: refused without an error"
                );
                for e in &errors.0 {
                    // Errors in the file point into it (1-based); errors in a
                    // template name that template.
                    if e.file == path {
                        assert!(
                            e.pos.line >= 1 && e.pos.line <= lines + 1 && e.pos.column >= 1,
                            "seed {seed}: {e} points outside the file ({lines} lines)\n{text}"
                        );
                    }
                    assert!(!e.message.is_empty(), "seed {seed}: empty message");
                }
            }
        }
        std::fs::write(&path, original).expect("restore");
    }
    eprintln!("fuzz_loader: {loaded} loaded, {refused} refused, slowest {slowest:?}");
    assert!(refused > 0, "the mutations must exercise the error paths");
}
