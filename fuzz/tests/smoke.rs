//! The fuzz targets on the stable toolchain, without coverage guidance:
//! every seed, every input libFuzzer has saved in `corpus/` (if a run left
//! one), and a few thousand mutations of the seeds per target (bit flips,
//! byte edits, truncations, splices, repeated chunks, interesting values).
//! It proves the bodies run and keeps found regressions fixed; the search
//! itself is libFuzzer's (`fuzz/run.sh`). `EVIO_FUZZ_SMOKE_ROUNDS` changes
//! the number of mutations, `EVIO_FUZZ_SMOKE_SEED` the generator's seed.

use std::path::{Path, PathBuf};

type Body = fn(&[u8]);

const TARGETS: &[(&str, Body)] = &[
    ("netconf", evio_fuzz::netconf),
    ("cni_env", evio_fuzz::cni_env),
    ("cni_result", evio_fuzz::cni_result),
    ("node_netconf", evio_fuzz::node_netconf),
    ("ovsdb_reply", evio_fuzz::ovsdb_reply),
    ("store_record", evio_fuzz::store_record),
    ("overlay", evio_fuzz::overlay),
    ("switch", evio_fuzz::switch),
    ("portmap", evio_fuzz::portmap),
    ("upnp", evio_fuzz::upnp),
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"\"",
    b"\\",
    b"\\u0000",
    b"[",
    b"]",
    b"{",
    b"}",
    b":",
    b",",
    b"-1",
    b"0",
    b"1e999",
    b"18446744073709551616",
    b"65536",
    b"null",
    b"true",
    b"\"\"",
    b"../",
    b"/",
    b";",
    b"=",
    b"::",
    b"/129",
    b"-33",
    b"[\"set\",[]]",
    b"[\"map\",[[\"a\",\"b\"]]]",
    b"[\"uuid\",\"x\"]",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next() as u8;
            }
            2 => d.truncate(rng.below(len + 1)),
            3 if len > 0 => {
                let (a, b) = (rng.below(len), rng.below(len));
                let (a, b) = (a.min(b), a.max(b));
                let piece = d[a..b].to_vec();
                let at = rng.below(d.len() + 1);
                d.splice(
                    at..at,
                    piece
                        .iter()
                        .copied()
                        .cycle()
                        .take(piece.len() * (1 + rng.below(3))),
                );
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let cut = rng.below(other.len() + 1);
                let at = rng.below(d.len() + 1);
                d.splice(at.., other[cut..].iter().copied());
            }
            5 if len > 0 => {
                let (a, b) = (rng.below(len), rng.below(len));
                d.drain(a.min(b)..a.max(b));
            }
            _ => {
                let ins = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(d.len() + 1);
                d.splice(at..at, ins.iter().copied());
            }
        }
    }
    d
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_target_survives_its_seeds_corpus_and_mutations() {
    let rounds: usize = std::env::var("EVIO_FUZZ_SMOKE_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = std::env::var("EVIO_FUZZ_SMOKE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, body) in TARGETS {
        let seed_files = files(&root.join("seeds").join(name));
        assert!(!seed_files.is_empty(), "no seeds for {name}");
        let seeds: Vec<Vec<u8>> = seed_files
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .collect();
        for (p, s) in seed_files.iter().zip(&seeds) {
            eprintln!("{name}: seed {}", p.display());
            body(s);
        }
        for p in files(&root.join("corpus").join(name)) {
            if let Ok(d) = std::fs::read(&p) {
                body(&d);
            }
        }
        let mut rng = Rng(seed ^ name.len() as u64);
        for i in 0..rounds {
            let input = mutate(&mut rng, &seeds);
            let r = std::panic::catch_unwind(|| body(&input));
            assert!(
                r.is_ok(),
                "{name}: mutation {i} (seed {seed}) panicked on input {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
}
