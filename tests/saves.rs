//! Saving files: what killed saves leave behind, long names, links and
//! permissions. Every writer shares one atomic write, so `.npy` and
//! checkpoints stand for all of them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use embtable::io;
use embtable::{Adagrad, EmbeddingTable, Init};

mod common;
use common::Scratch;

/// Where `saves_until_killed` saves, when run as a child.
const SAVE_TO: &str = "EMBTABLE_TEST_SAVE_TO";

/// A table of 64 MiB: its save takes long enough to be killed midway.
fn big_table() -> EmbeddingTable {
    EmbeddingTable::new(1 << 18, 64, Init::default(), 1).unwrap()
}

/// As the child of `killed_saves_leave_no_temporary_files`: saves a large
/// table over and over, printing a line after each save, until killed. On
/// its own, as a test: one such save reads back.
#[test]
fn saves_until_killed() {
    match std::env::var_os(SAVE_TO) {
        Some(path) => {
            let table = big_table();
            loop {
                io::save_checkpoint(&path, &table, &Adagrad::default()).unwrap();
                println!("saved");
            }
        }
        None => {
            let dir = Scratch::new("one-big-save");
            let path = dir.path("big.safetensors");
            let table = big_table();
            io::save_checkpoint(&path, &table, &Adagrad::default()).unwrap();
            let back = io::load_checkpoint(&path, &mut Adagrad::default()).unwrap();
            assert_eq!(back, table);
            assert_eq!(dir.entries(), ["big.safetensors"]);
        }
    }
}

/// Killed saves (`SIGKILL`: no destructor runs) leave their temporary files;
/// the next save to the same file removes them. (They once piled up: 880
/// MiB after 20 kills.)
#[test]
fn killed_saves_leave_no_temporary_files() {
    let dir = Scratch::new("killed");
    let path = dir.path("model.safetensors");
    let exe = std::env::current_exe().unwrap();
    // Kill a child right after it reports a save: it is then inside the
    // next one, unless the kill lands in the instant between two saves, in
    // which case another child is started. (Each child's first save removes
    // what the previous one left, so the test stops at the first kill that
    // leaves a temporary file.)
    let mut tries = 0;
    let leftovers = loop {
        tries += 1;
        let mut child = Command::new(&exe)
            .args([
                "saves_until_killed",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SAVE_TO, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let saved = lines.any(|l| l.is_ok_and(|l| l.contains("saved")));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(saved, "the child never saved");
        let entries = dir.entries();
        if entries.len() > 1 {
            break entries.len() - 1;
        }
        assert!(tries < 50, "no kill landed inside a save");
    };
    assert!(leftovers >= 1, "{:?}", dir.entries());
    // The next save removes the temporary files of the killed ones.
    let table = EmbeddingTable::new(3, 2, Init::default(), 2).unwrap();
    io::save_checkpoint(&path, &table, &Adagrad::default()).unwrap();
    assert_eq!(dir.entries(), ["model.safetensors"]);
    assert_eq!(
        io::load_checkpoint(&path, &mut Adagrad::default()).unwrap(),
        table
    );
}

/// The longest name most file systems allow, 255 bytes, saves: the
/// temporary name is cut to fit (it was the name plus 20 bytes or so).
#[test]
fn names_at_the_length_limit_save() {
    let dir = Scratch::new("long-name");
    let table = EmbeddingTable::new(4, 3, Init::default(), 3).unwrap();
    for name in [
        format!("{}.npy", "n".repeat(251)),
        format!("{}.npy", "é".repeat(125)), // 250 bytes of 2-byte characters, cut inside none
        "x".repeat(250),
    ] {
        assert!(name.len() <= 255);
        let path = dir.path(&name);
        io::save_npy(&path, &table).unwrap();
        io::save_npy(&path, &table).unwrap(); // and over an existing file
        assert_eq!(io::load_npy(&path).unwrap(), table);
    }
    assert_eq!(dir.entries().len(), 3);
}

/// Saving through a symbolic link replaces the file it points to and keeps
/// the link (it used to replace the link by a file).
#[cfg(unix)]
#[test]
fn saves_follow_symbolic_links() {
    use std::os::unix::fs::symlink;
    let dir = Scratch::new("links");
    std::fs::create_dir(dir.path("store")).unwrap();
    let old = EmbeddingTable::new(4, 3, Init::default(), 4).unwrap();
    let new = EmbeddingTable::new(5, 3, Init::default(), 5).unwrap();
    let target = dir.path("store/real.npy");
    io::save_npy(&target, &old).unwrap();
    // A relative link to the file, and a link to that link.
    symlink("store/real.npy", dir.path("link.npy")).unwrap();
    symlink(dir.path("link.npy"), dir.path("link2.npy")).unwrap();

    io::save_npy(dir.path("link2.npy"), &new).unwrap();
    for name in ["link.npy", "link2.npy"] {
        let meta = std::fs::symlink_metadata(dir.path(name)).unwrap();
        assert!(meta.file_type().is_symlink(), "{name} is no longer a link");
    }
    assert_eq!(io::load_npy(&target).unwrap(), new);
    assert_eq!(io::load_npy(dir.path("link.npy")).unwrap(), new);

    // A dangling link: the file it names is created.
    symlink("store/later.npy", dir.path("dangling.npy")).unwrap();
    io::save_npy(dir.path("dangling.npy"), &old).unwrap();
    assert_eq!(io::load_npy(dir.path("store/later.npy")).unwrap(), old);

    // A loop of links is an error, not a hang.
    symlink("loop-b", dir.path("loop-a")).unwrap();
    symlink("loop-a", dir.path("loop-b")).unwrap();
    let err = io::save_npy(dir.path("loop-a"), &old).unwrap_err();
    assert!(err.to_string().contains("symbolic links"), "{err}");
    let mut entries = dir.entries();
    entries.sort();
    assert_eq!(
        entries,
        [
            "dangling.npy",
            "link.npy",
            "link2.npy",
            "loop-a",
            "loop-b",
            "store"
        ]
    );
}

/// A file made private stays private when saved over.
#[cfg(unix)]
#[test]
fn saving_over_a_file_keeps_its_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("perms");
    let path = dir.path("private.npy");
    let table = EmbeddingTable::new(4, 3, Init::default(), 6).unwrap();
    io::save_npy(&path, &table).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    io::save_npy(&path, &table).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
