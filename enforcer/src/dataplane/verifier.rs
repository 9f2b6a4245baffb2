//! The verifier's own statistics of a loaded program: peak states and stack depth, which
//! the kernel reports only in the verifier log (`BPF_LOG_STATS`), never in
//! `bpf_prog_info`.
//!
//! aya 0.14 asks for a log only after a load failed, so these come from a second load of
//! the same program: the object parsed again with aya-obj, relocated against the maps the
//! loaded programs use (found by id, so the copy runs against exactly the same maps),
//! with the loaded program's BTF, and `BPF_PROG_LOAD` issued here with log level 4. The
//! kernel verifies that copy as it verified the first, and the copy is closed at once.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    ffi::CString,
    io, mem,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::{
    maps::{MapData, MapInfo},
    programs::ProgramInfo,
};
use aya_obj::{
    Object,
    generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type},
};
use thiserror::Error;

/// What the verifier log says about one program.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifierStats {
    /// Instructions processed (the figure the 1,000,000 limit applies to).
    pub processed: u32,
    /// The most verifier states held at once: what its memory grows with.
    pub peak_states: u32,
    /// States created in all.
    pub total_states: u32,
    /// Stack bytes of each function the program calls, main program first; the kernel's
    /// limit is 512 bytes along any call chain.
    pub stack_depth: Vec<u32>,
}

/// Errors of [`stats`].
#[derive(Debug, Error)]
pub enum VerifierError {
    /// The object did not parse or relocate (it loaded once, so this is a bug here).
    #[error("preparing a copy of {program} for the verifier: {detail}")]
    Prepare {
        /// The program.
        program: String,
        /// What failed.
        detail: String,
    },
    /// A syscall failed.
    #[error("{op} for {program}: {source}")]
    Syscall {
        /// The program.
        program: String,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The log had no statistics line.
    #[error("the verifier log of {program} has no statistics: {log:?}")]
    NoStats {
        /// The program.
        program: String,
        /// The log as read.
        log: String,
    },
}

/// `BPF_LOG_STATS`: only the statistics, a few lines, however large the program.
const BPF_LOG_STATS: u32 = 4;
/// Kernel map names are at most 15 bytes (`BPF_OBJ_NAME_LEN` with the NUL).
const OBJ_NAME_MAX: usize = 15;

/// Verifies again each of `programs` (name and the loaded program's info; XDP or sched_cls) from `object`
/// and returns what the verifier log says about it, in the same order.
pub fn stats(
    object: &[u8],
    programs: &[(&str, ProgramInfo)],
) -> Result<Vec<VerifierStats>, VerifierError> {
    let prepare = |program: &str, detail: String| VerifierError::Prepare {
        program: program.to_string(),
        detail,
    };
    let all = programs.first().map_or("", |(name, _)| name);

    // The maps the loaded programs use, by their kernel name.
    let mut by_name: HashMap<String, MapData> = HashMap::new();
    for (name, info) in programs {
        let ids = info
            .map_ids()
            .map_err(|e| prepare(name, format!("reading map ids: {e}")))?
            .unwrap_or_default();
        for id in ids {
            let map_info = MapInfo::from_id(id)
                .map_err(|e| prepare(name, format!("reading map {id}: {e}")))?;
            let kernel_name = map_info.name_as_str().unwrap_or_default().to_string();
            if let Entry::Vacant(slot) = by_name.entry(kernel_name) {
                let data = MapData::from_id(id)
                    .map_err(|e| prepare(name, format!("opening map {id}: {e}")))?;
                slot.insert(data);
            }
        }
    }

    let mut obj = Object::parse(object).map_err(|e| prepare(all, e.to_string()))?;
    let maps: Vec<(String, aya_obj::Map)> = obj
        .maps
        .iter()
        .map(|(name, map)| (name.clone(), map.clone()))
        .collect();
    let fds: Vec<(&str, i32, &aya_obj::Map)> = maps
        .iter()
        .filter_map(|(name, map)| {
            let kernel_name = &name[..name.len().min(OBJ_NAME_MAX)];
            let data = by_name.get(kernel_name)?;
            Some((name.as_str(), data.fd().as_fd().as_raw_fd(), map))
        })
        .collect();
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(fds.into_iter(), &text_sections)
        .map_err(|e| prepare(all, e.to_string()))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| prepare(all, e.to_string()))?;
    obj.sanitize_functions(aya::features());

    programs
        .iter()
        .map(|(name, info)| {
            let program = obj
                .programs
                .get(*name)
                .ok_or_else(|| prepare(name, "not in the object".to_string()))?;
            let function = obj
                .functions
                .get(&program.function_key())
                .ok_or_else(|| prepare(name, "its function is not in the object".to_string()))?;
            let btf = match info.btf_id() {
                Some(id) => Some(btf_fd(id).map_err(|source| VerifierError::Syscall {
                    program: name.to_string(),
                    op: "opening the program's BTF",
                    source,
                })?),
                None => None,
            };
            let log = load_with_stats(
                name,
                info.program_type(),
                &program.license,
                function,
                btf.as_ref(),
            )?;
            parse_stats(&log).ok_or_else(|| VerifierError::NoStats {
                program: name.to_string(),
                log,
            })
        })
        .collect()
}

/// `BPF_BTF_GET_FD_BY_ID` (Linux 5.0).
fn btf_fd(id: u32) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero bpf_attr is valid for every command.
    let mut attr = unsafe { mem::zeroed::<bpf_attr>() };
    attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
    bpf_fd(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr)
}

/// Loads `function` as a program of `kind` (as the loaded one) with a statistics log and
/// returns the log; the program itself is closed at once.
fn load_with_stats(
    name: &str,
    kind: bpf_prog_type,
    license: &CString,
    function: &aya_obj::Function,
    btf: Option<&OwnedFd>,
) -> Result<String, VerifierError> {
    let mut log = vec![0u8; 64 * 1024];
    let func_info = function.func_info.func_info_bytes();
    let line_info = function.line_info.line_info_bytes();
    // SAFETY: an all-zero bpf_attr is valid for every command.
    let mut attr = unsafe { mem::zeroed::<bpf_attr>() };
    // SAFETY: BPF_PROG_LOAD reads the `__bindgen_anon_3` member of the union.
    let u = unsafe { &mut attr.__bindgen_anon_3 };
    u.prog_type = kind as u32;
    // What aya passes for the two types this crate loads: XDP declares its attach type,
    // sched_cls none.
    if kind == bpf_prog_type::BPF_PROG_TYPE_XDP {
        u.expected_attach_type = bpf_attach_type::BPF_XDP as u32;
    }
    u.insns = function.instructions.as_ptr() as u64;
    u.insn_cnt = function.instructions.len() as u32;
    u.license = license.as_ptr() as u64;
    for (dst, src) in u.prog_name.iter_mut().zip(name.bytes().take(OBJ_NAME_MAX)) {
        *dst = src as libc::c_char;
    }
    if let Some(btf) = btf {
        u.prog_btf_fd = btf.as_raw_fd() as u32;
        if function.func_info_rec_size > 0 {
            u.func_info = func_info.as_ptr() as u64;
            u.func_info_cnt = function.func_info.len() as u32;
            u.func_info_rec_size = function.func_info_rec_size as u32;
        }
        if function.line_info_rec_size > 0 {
            u.line_info = line_info.as_ptr() as u64;
            u.line_info_cnt = function.line_info.len() as u32;
            u.line_info_rec_size = function.line_info_rec_size as u32;
        }
    }
    u.log_level = BPF_LOG_STATS;
    u.log_buf = log.as_mut_ptr() as u64;
    u.log_size = log.len() as u32;
    // The fd closes when dropped: only the log is wanted.
    let loaded = bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr);
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).into_owned();
    match loaded {
        Ok(_fd) => Ok(text),
        Err(source) => Err(VerifierError::Syscall {
            program: name.to_string(),
            op: "verifying a copy",
            source: io::Error::new(source.kind(), format!("{source}; log: {text}")),
        }),
    }
}

/// Issues a bpf(2) command that returns a new file descriptor.
fn bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    // SAFETY: attr is a bpf_attr whose pointers (set by the callers) stay valid for the
    // duration of the call; the size passed is the size of the union.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success these commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// Reads the two statistics lines of a verifier log:
/// `stack depth 96+0+32` and
/// `processed N insns (limit 1000000) max_states_per_insn M total_states T peak_states P mark_read R`.
fn parse_stats(log: &str) -> Option<VerifierStats> {
    let mut stats = VerifierStats::default();
    let mut found = false;
    for line in log.lines() {
        if let Some(depths) = line.strip_prefix("stack depth ") {
            stats.stack_depth = depths
                .trim()
                .split('+')
                .map(|d| d.parse().ok())
                .collect::<Option<_>>()?;
        } else if let Some(rest) = line.strip_prefix("processed ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            stats.processed = words.first()?.parse().ok()?;
            let field = |key: &str| {
                words
                    .windows(2)
                    .find(|w| w[0] == key)
                    .and_then(|w| w[1].parse().ok())
            };
            stats.peak_states = field("peak_states")?;
            stats.total_states = field("total_states")?;
            found = true;
        }
    }
    found.then_some(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_statistics_lines() {
        let log = "verification time 301224 usec\nstack depth 120+0+48\n\
                   processed 410231 insns (limit 1000000) max_states_per_insn 12 total_states 23055 peak_states 2960 mark_read 513\n";
        assert_eq!(
            parse_stats(log),
            Some(VerifierStats {
                processed: 410_231,
                peak_states: 2960,
                total_states: 23_055,
                stack_depth: vec![120, 0, 48],
            })
        );
        assert_eq!(parse_stats("stack depth 8\n"), None, "no processed line");
        assert_eq!(
            parse_stats("processed 5 insns (limit 1000000) max_states_per_insn 0\n"),
            None,
            "a line without the states is not read as zero"
        );
    }
}
