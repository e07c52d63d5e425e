//! Finds where a task's saved user registers (`struct pt_regs`) sit on its kernel stack, so
//! the socket and sched programs can read a syscall's arguments without any syscall hook.
//!
//! The kernel tells one program that address: `raw_syscalls:sys_exit` gets it as its first
//! argument. So at start-up `tally_calibrate` is attached there for a moment, the agent makes
//! a syscall, and the program copies that address and the first words of the agent's
//! `task_struct`. One of those words is the task's kernel stack (`task->stack`): page
//! aligned, just below `pt_regs`, which ends at the top of the stack (`THREAD_SIZE`, a power
//! of two, less x86's FRED padding). [`layout`] finds it; the programs then compute
//! `*(task + task_stack) + regs_at` for any task. The hook is detached at once: a syscall
//! hook switches on the syscall-tracing slow path for every task of the node.

use std::time::Duration;

use agent_common::{CALIBRATION_WORDS, Calibration, RegsLayout};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::RawTracePoint,
};
use tracing::info;

use crate::error::Error;

/// The calibration program and the raw tracepoint it attaches to for a moment.
const PROGRAM: &str = crate::loader::CALIBRATION.name;
const TRACEPOINT: &str = crate::loader::CALIBRATION.tracepoint;
/// `sizeof(struct pt_regs)` on x86_64.
const PT_REGS_SIZE: u64 = 168;
/// Padding x86 may leave above `pt_regs` (`TOP_OF_KERNEL_STACK_PADDING` with FRED).
const STACK_PADDINGS: [u64; 2] = [0, 16];
/// Largest kernel stack considered (16 KiB is x86_64's usual, 32 KiB with KASAN).
const MAX_STACK: u64 = 64 * 1024;

/// The word of `c.task` that is the kernel stack `c.regs` lies on, as a layout; `None` if
/// no word, or more than one, fits.
pub fn layout(c: &Calibration) -> Option<RegsLayout> {
    let mut found = None;
    for (i, &w) in c.task.iter().enumerate() {
        if w == 0 || w % 4096 != 0 || c.regs <= w || c.regs - w > MAX_STACK {
            continue;
        }
        let top = c.regs - w + PT_REGS_SIZE;
        if !STACK_PADDINGS
            .iter()
            .any(|pad| (top + pad).is_power_of_two())
        {
            continue;
        }
        if found.is_some() {
            return None;
        }
        found = Some(RegsLayout {
            task_stack: (i * 8) as u64,
            regs_at: c.regs - w,
        });
    }
    found
}

/// Calibrates and writes the layout into the programs' `LAYOUT` map. Must run before the
/// programs that read registers are attached (they do nothing until then).
pub fn calibrate(ebpf: &mut Ebpf) -> Result<RegsLayout, Error> {
    let request = Calibration {
        tgid: std::process::id(),
        done: 0,
        regs: 0,
        task: [0; CALIBRATION_WORDS],
    };
    Array::<&mut MapData, Calibration>::try_from(map(ebpf, "CALIBRATION")?)?.set(0, request, 0)?;
    let prog: &mut RawTracePoint = ebpf
        .program_mut(PROGRAM)
        .ok_or(Error::Program {
            name: PROGRAM,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| Error::Program {
            name: PROGRAM,
            source,
        })?;
    let program_error = |source| Error::Program {
        name: PROGRAM,
        source,
    };
    prog.load().map_err(program_error)?;
    let link = prog.attach(TRACEPOINT).map_err(program_error)?;
    let mut seen = None;
    for _ in 0..200 {
        // Any syscall of this process will do; the program runs at its exit.
        let _ = std::os::unix::process::parent_id();
        let c =
            Array::<&MapData, Calibration>::try_from(map_ref(ebpf, "CALIBRATION")?)?.get(&0, 0)?;
        if c.done != 0 {
            seen = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let prog: &mut RawTracePoint = ebpf
        .program_mut(PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::Calibration("the calibration program went away"))?;
    prog.detach(link).map_err(program_error)?;
    prog.unload().map_err(program_error)?;
    let c = seen.ok_or(Error::Calibration(
        "the calibration program never saw a syscall of the agent",
    ))?;
    let l = layout(&c).ok_or(Error::Calibration(
        "no single word of task_struct is the kernel stack under pt_regs",
    ))?;
    Array::<&mut MapData, RegsLayout>::try_from(map(ebpf, "LAYOUT")?)?.set(0, l, 0)?;
    info!(
        task_stack = l.task_stack,
        regs_at = l.regs_at,
        "saved user registers located (syscall hook detached)"
    );
    Ok(l)
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, Error> {
    ebpf.map_mut(name).ok_or(Error::MissingMap(name))
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, Error> {
    ebpf.map(name).ok_or(Error::MissingMap(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACK: u64 = 0xffff_c900_0012_0000;

    fn calibration(stack_word: usize, top_padding: u64, thread_size: u64) -> Calibration {
        let mut task = [0u64; CALIBRATION_WORDS];
        // Words that are pointers elsewhere, or small integers, as in a real task_struct.
        task[0] = 0x4000;
        task[1] = 0xffff_8881_0345_6780;
        task[stack_word] = STACK;
        task[stack_word + 1] = 0xffff_8881_0345_6000;
        Calibration {
            tgid: 1,
            done: 1,
            regs: STACK + thread_size - top_padding - PT_REGS_SIZE,
            task,
        }
    }

    #[test]
    fn finds_the_stack_word_and_the_offset_of_pt_regs() {
        for (pad, size) in [(0, 16384), (16, 16384), (0, 32768)] {
            let c = calibration(4, pad, size);
            assert_eq!(
                layout(&c),
                Some(RegsLayout {
                    task_stack: 32,
                    regs_at: size - pad - PT_REGS_SIZE,
                })
            );
        }
    }

    #[test]
    fn refuses_no_match_and_two_matches() {
        let mut c = calibration(4, 0, 16384);
        c.task[4] = 0;
        assert_eq!(layout(&c), None);
        let mut c = calibration(4, 0, 16384);
        c.task[9] = STACK;
        assert_eq!(layout(&c), None);
        // pt_regs not at the top of that stack: not a stack base.
        let mut c = calibration(4, 0, 16384);
        c.regs -= 8;
        assert_eq!(layout(&c), None);
    }
}
