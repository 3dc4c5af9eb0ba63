//! Issue 18: a corrupt store stops the start, loudly. A store built from
//! many separate writes (40 `backend add`) and one built by a single large
//! `apply` (300 backends), stopped cleanly, then 256 bytes XORed into
//! sled's `db` file at 13 offsets, each on a fresh copy: every start either
//! serves every acknowledged backend or exits non-zero before `listening`
//! with a message saying why — never fewer backends, never a hang. A mark
//! file newer than its store (an older `db` put back) is refused with the
//! message, and a start that cannot open its store within
//! `--startup-check-timeout` exits instead of waiting.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use claw_tests::harness::{ControlPlane, random_hex};

/// The messages of a refused start (one of them must be in its output).
const REFUSALS: [&str; 4] = [
    "the store lost acknowledged changes after version",
    "the integrity check of data directory",
    "did not finish within",
    "opening data directory",
];

/// Fractions of the `db` file's length the damage goes to, in percent.
const OFFSETS: [u64; 13] = [5, 10, 18, 26, 34, 42, 50, 58, 66, 74, 82, 90, 95];

/// Starts checked in parallel (each is a process and a sled recovery).
const PARALLEL: usize = 4;

const API_KEY: &str = "sk-test-0123456789abcdef";

fn backend_name(i: usize) -> String {
    format!("corrupt-be-{i:03}")
}

/// Copies the directory `from` (files and subdirectories) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the data dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// XORs 256 bytes of `file` at `percent` % of its length.
fn damage(file: &Path, percent: u64) {
    let mut bytes = std::fs::read(file).expect("read db");
    let len = bytes.len();
    assert!(len > 1024, "db is only {len} bytes");
    let start = (len as u64 * percent / 100) as usize;
    let start = start.min(len - 256);
    for (i, b) in bytes[start..start + 256].iter_mut().enumerate() {
        *b ^= 0xA5 ^ (i as u8);
    }
    std::fs::write(file, bytes).expect("write db");
}

/// What a start on a data directory did.
#[derive(Debug)]
enum Outcome {
    /// It listened and served these backend names.
    Served(BTreeSet<String>),
    /// It exited non-zero before listening, with this output.
    Refused(String),
}

/// Starts a control plane on `dir` with `master_key`: what it served, or
/// how it refused. Fails the test on a hang (no `listening`, no exit).
fn start_on(dir: &Path, master_key: &str) -> Outcome {
    let started = ControlPlane::builder()
        .data_dir(dir)
        .master_key(master_key)
        .args(["--startup-check-timeout", "20s"])
        .start_timeout(Duration::from_secs(60))
        .try_start();
    match started {
        Ok(mut cp) => {
            let list = cp
                .clawctl(&["backend", "list", "-o", "json"])
                .assert_ok()
                .json();
            let names = list
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter_map(|b| b["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            cp.stop();
            Outcome::Served(names)
        }
        Err(e) => {
            let status = e.status.unwrap_or_else(|| {
                panic!(
                    "the control plane on {} neither listened nor exited (a hang): {e}",
                    dir.display()
                )
            });
            assert!(!status.success(), "exited 0 without listening: {e}");
            assert!(
                REFUSALS.iter().any(|m| e.output.contains(m)),
                "a refusal without the message: {e}"
            );
            Outcome::Refused(e.output)
        }
    }
}

/// Damages a copy of `source` at each of [`OFFSETS`] and starts a control
/// plane on each: all of `want` served, or refused with the message.
/// Returns how many starts the high-water mark refused.
fn every_offset_serves_all_or_refuses(
    source: &Path,
    master_key: &str,
    want: &BTreeSet<String>,
) -> usize {
    let db = source.join("db");
    assert!(db.is_file(), "sled keeps its log in {}", db.display());
    let work = tempfile::tempdir().expect("tempdir");
    let dirs: Vec<(u64, PathBuf)> = OFFSETS
        .iter()
        .map(|&p| {
            let dir = work.path().join(format!("at-{p}"));
            copy_dir(source, &dir);
            damage(&dir.join("db"), p);
            (p, dir)
        })
        .collect();
    let mut outcomes = Vec::new();
    for chunk in dirs.chunks(PARALLEL) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(p, dir)| (*p, s.spawn(move || start_on(dir, master_key))))
                .collect();
            for (p, h) in handles {
                outcomes.push((p, h.join().expect("start thread")));
            }
        });
    }
    let mut summary = Vec::new();
    for (p, outcome) in &outcomes {
        match outcome {
            Outcome::Served(names) => {
                assert_eq!(
                    names,
                    want,
                    "damage at {p} %: served {} of {} backends",
                    names.intersection(want).count(),
                    want.len()
                );
                summary.push(format!("{p}%: served all"));
            }
            Outcome::Refused(out) => {
                let line = out
                    .lines()
                    .rev()
                    .find(|l| l.contains("error"))
                    .unwrap_or_default();
                summary.push(format!("{p}%: refused ({line})"));
            }
        }
    }
    eprintln!("{}", summary.join("\n"));
    outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Refused(out) if out.contains(REFUSALS[0])))
        .count()
}

/// A copy of `source` (the damaged copies start from the state a clean
/// stop left) serves all of `want`.
fn undamaged_serves_all(source: &Path, master_key: &str, want: &BTreeSet<String>) {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("intact");
    copy_dir(source, &dir);
    match start_on(&dir, master_key) {
        Outcome::Served(names) => assert_eq!(&names, want),
        Outcome::Refused(out) => panic!("the undamaged store was refused: {out}"),
    }
}

#[test]
fn damage_after_many_single_writes_is_served_whole_or_refused() {
    let mut cp = ControlPlane::start();
    let mut want = BTreeSet::new();
    for i in 0..40 {
        let name = backend_name(i);
        cp.clawctl_with_env(
            &[
                "backend",
                "add",
                &name,
                "--url",
                "https://api.example.com/v1",
                "--api-key-env",
                "K",
                "--model",
                "gpt-4o",
            ],
            &[("K", API_KEY)],
        )
        .assert_ok();
        want.insert(name);
    }
    cp.stop_clean();
    // The undamaged store serves them all.
    undamaged_serves_all(cp.data_dir(), cp.master_key(), &want);
    // Without the mark, sled's recovery served 0 to 38 of them here.
    let by_mark = every_offset_serves_all_or_refuses(cp.data_dir(), cp.master_key(), &want);
    assert!(
        by_mark > 0,
        "the high-water mark refused none of the starts"
    );
}

#[test]
fn damage_after_one_large_apply_is_served_whole_or_refused() {
    let mut cp = ControlPlane::start();
    let work = tempfile::tempdir().expect("tempdir");
    let file = work.path().join("backends.yaml");
    let mut doc = String::from("backends:\n");
    let mut want = BTreeSet::new();
    for i in 0..300 {
        let name = backend_name(i);
        doc.push_str(&format!(
            "  - name: {name}\n    base_url: https://b{i}.example.com/v1\n    api_key_env: K\n    rpm: 60\n    models:\n      - canonical: gpt-4o\n"
        ));
        want.insert(name);
    }
    std::fs::write(&file, doc).expect("write the document");
    cp.clawctl_with_env(
        &["apply", "-f", file.to_str().expect("utf-8 path")],
        &[("K", API_KEY)],
    )
    .assert_ok();
    cp.stop_clean();
    undamaged_serves_all(cp.data_dir(), cp.master_key(), &want);
    // Without the mark, sled's recovery served 0 to 38 of them here.
    let by_mark = every_offset_serves_all_or_refuses(cp.data_dir(), cp.master_key(), &want);
    assert!(
        by_mark > 0,
        "the high-water mark refused none of the starts"
    );
}

fn add(cp: &ControlPlane, name: &str) {
    cp.clawctl_with_env(
        &[
            "backend",
            "add",
            name,
            "--url",
            "https://api.example.com/v1",
            "--api-key-env",
            "K",
            "--model",
            "gpt-4o",
        ],
        &[("K", API_KEY)],
    )
    .assert_ok();
}

#[test]
fn an_older_store_under_a_newer_mark_is_refused_and_removing_the_mark_accepts_it() {
    let mut cp = ControlPlane::start();
    add(&cp, "early");
    cp.stop_clean();
    let work = tempfile::tempdir().expect("tempdir");
    let older = work.path().join("older");
    copy_dir(cp.data_dir(), &older);
    cp.restart();
    add(&cp, "late");
    cp.stop_clean();
    // The older files with the newer mark: the store "lost" `late`.
    std::fs::copy(cp.data_dir().join("claw.hwm"), older.join("claw.hwm")).expect("copy mark");
    let Outcome::Refused(out) = start_on(&older, cp.master_key()) else {
        panic!("an older store under a newer mark was served");
    };
    assert!(
        out.contains("the store lost acknowledged changes after version")
            && out.contains("restore from a backup")
            && out.contains(&older.display().to_string()),
        "{out}"
    );
    // The documented escape: without the mark the store is taken as it is.
    std::fs::remove_file(older.join("claw.hwm")).expect("rm mark");
    let Outcome::Served(names) = start_on(&older, cp.master_key()) else {
        panic!("the store without a mark was refused");
    };
    assert_eq!(names, BTreeSet::from(["early".to_string()]));
    assert!(older.join("claw.hwm").is_file(), "a fresh mark is written");
    // The newer store itself is fine.
    let Outcome::Served(names) = start_on(cp.data_dir(), cp.master_key()) else {
        panic!("the intact store was refused");
    };
    assert_eq!(names.len(), 2);
}

#[test]
fn a_truncated_log_is_served_whole_or_refused() {
    let mut cp = ControlPlane::start();
    let mut want = BTreeSet::new();
    for i in 0..10 {
        add(&cp, &backend_name(i));
        want.insert(backend_name(i));
    }
    cp.stop_clean();
    let work = tempfile::tempdir().expect("tempdir");
    for keep in [50u64, 80, 95] {
        let dir = work.path().join(format!("keep-{keep}"));
        copy_dir(cp.data_dir(), &dir);
        let db = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("db"))
            .expect("open db");
        let len = db.metadata().expect("meta").len();
        db.set_len(len * keep / 100).expect("truncate");
        drop(db);
        match start_on(&dir, cp.master_key()) {
            Outcome::Served(names) => assert_eq!(names, want, "truncated to {keep} %"),
            Outcome::Refused(_) => {}
        }
    }
}

#[test]
fn a_start_that_cannot_open_its_store_in_time_exits_before_listening() {
    let mut cp = ControlPlane::start();
    add(&cp, "b1");
    cp.stop_clean();
    // Another holder of the directory's lock: opening waits for it (2 s)
    // longer than the bound allows.
    let held = claw_control_plane::store::sled::SledStore::open(cp.data_dir()).expect("opens");
    let err = ControlPlane::builder()
        .data_dir(cp.data_dir())
        .master_key(cp.master_key())
        .args(["--startup-check-timeout", "500ms"])
        .start_timeout(Duration::from_secs(60))
        .try_start()
        .expect_err("started while the store could not be opened");
    assert!(
        err.status.is_some_and(|s| !s.success()),
        "exits non-zero: {err}"
    );
    assert!(
        err.output
            .contains("did not finish within 500ms (--startup-check-timeout)"),
        "{err}"
    );
    drop(held);
    // A wrong key is still refused, and the intact store still starts.
    let wrong = ControlPlane::builder()
        .data_dir(cp.data_dir())
        .master_key(random_hex(32))
        .try_start();
    assert!(wrong.is_err(), "a wrong master key was accepted");
    let Outcome::Served(names) = start_on(cp.data_dir(), cp.master_key()) else {
        panic!("the intact store was refused");
    };
    assert_eq!(names, BTreeSet::from(["b1".to_string()]));
}

#[test]
fn a_record_that_does_not_decode_stops_the_start_naming_its_tree() {
    use claw_control_plane::store::{Rollback, Store as _, Tree};
    let mut cp = ControlPlane::start();
    add(&cp, "b1");
    cp.clawctl(&["agent", "add", "a1", "--model", "gpt-4o"])
        .assert_ok();
    cp.stop_clean();
    {
        let store = claw_control_plane::store::sled::SledStore::open(cp.data_dir()).expect("opens");
        assert!(
            store
                .transaction(&[Tree::Agents], &|txn| {
                    txn.insert(Tree::Agents, b"a1", &[0xff, 0xff, 0xff])
                        .map_err(|_| Rollback)
                })
                .expect("transaction")
        );
        store.flush_blocking().expect("flush");
    }
    let Outcome::Refused(out) = start_on(cp.data_dir(), cp.master_key()) else {
        panic!("a store with an undecodable record was served");
    };
    assert!(
        out.contains("the integrity check of data directory")
            && out.contains("in tree(s) agents")
            && out.contains("agents: key \"a1\": record does not decode"),
        "{out}"
    );
    // The emergency switch serves it as it is.
    let mut served = ControlPlane::builder()
        .data_dir(cp.data_dir())
        .master_key(cp.master_key())
        .arg("--skip-startup-check")
        .start();
    served.clawctl(&["backend", "get", "b1"]).assert_ok();
    assert!(served.logs().contains("startup integrity check is skipped"));
    served.stop_clean();
}
