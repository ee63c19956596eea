//! The CPUID each vCPU sees, derived from what KVM supports on this host.
//!
//! What Linux expects:
//! - Leaf 1: the initial APIC ID in EBX bits 31:24, the logical-processor count in EBX bits 23:16 with
//!   the HTT bit (EDX bits 28) when there is more than one, and the hypervisor bit (ECX bits 31) so it
//!   looks for the KVM leaves.
//! - Topology: leaf 0xB (and 0x1F when present) describing x2APIC ID bits per level (here one
//!   thread per core, `vcpu_count` cores in one package); leaf 4 EAX bits 31:26 cores per package;
//!   on AMD, leaf 0x80000008 ECX (core count, APIC-ID size) and 0x8000001E (core/node IDs).
//!   Inconsistent values make Linux print "topology broken" warnings or mis-size per-package
//!   structures.
//! - Leaf 0x40000000 = "KVMKVMKVM\0\0\0" and 0x40000001 = the KVM PV feature bits
//!   (kvm-clock etc.). Features that need hypercalls (`vmcall`) can be hidden: on nested
//!   hosts without VT-x `vmcall` hangs the vCPU.
//! - Leaf 0xD must agree with the XSAVE/AVX bits: a guest seeing AVX off but YMM in XCR0's
//!   supported mask (or XSAVE off but leaf 0xD populated) may try to enable state it must not.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use serde::{Deserialize, Serialize};

/// Errors from building a vCPU's CPUID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A VM needs at least one vCPU.
    #[error("vCPU count must be at least 1")]
    NoVcpus,
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU {id} is out of range for {count} vCPUs")]
    VcpuOutOfRange {
        /// Requested vCPU index.
        id: u32,
        /// Number of vCPUs.
        count: u32,
    },
    /// The feature mask names a feature this table does not know.
    #[error("Unknown CPU feature \"{0}\"")]
    UnknownFeature(String),
    /// The feature mask tries to add a feature.
    #[error("Cannot add CPU feature \"{0}\": only removing features (\"-name\") is supported")]
    CannotAddFeature(String),
    /// The resulting entry list does not fit the fam wrapper.
    #[error("Too many CPUID entries")]
    TooManyEntries,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// KVM PV feature bit: PV spinlock unhalt (uses the KICK_CPU hypercall).
pub const KVM_FEATURE_PV_UNHALT: u32 = 7;
/// KVM PV feature bit: PV IPIs (SEND_IPI hypercall).
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
/// KVM PV feature bit: PV sched yield (SCHED_YIELD hypercall).
pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;
/// KVM PV feature bit: MAP_GPA_RANGE hypercall.
pub const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 16;
/// PV features that make the guest issue `vmcall`; hidden by `hide_pv_hypercalls`.
/// (MIGRATION_CONTROL, bit 17, is an MSR and stays.)
pub const KVM_HYPERCALL_FEATURES: [u32; 4] = [
    KVM_FEATURE_PV_UNHALT,
    KVM_FEATURE_PV_SEND_IPI,
    KVM_FEATURE_PV_SCHED_YIELD,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
];

/// KVM signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM PV features leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A maskable CPU feature: its Linux `/proc/cpuinfo` name and where its bit lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Name as in Linux's `/proc/cpuinfo` (and `clearcpuid=`).
    pub name: &'static str,
    /// CPUID leaf.
    pub leaf: u32,
    /// CPUID subleaf.
    pub subleaf: u32,
    /// Register.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
}

const fn f(name: &'static str, leaf: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        leaf,
        subleaf: 0,
        reg,
        bit,
    }
}

const EXT: u32 = 0x8000_0001;

/// Every feature the mask can clear.
pub const FEATURES: &[Feature] = &[
    // Leaf 1 ECX.
    f("pni", 1, Reg::Ecx, 0),
    f("sse3", 1, Reg::Ecx, 0),
    f("pclmulqdq", 1, Reg::Ecx, 1),
    f("monitor", 1, Reg::Ecx, 3),
    f("vmx", 1, Reg::Ecx, 5),
    f("ssse3", 1, Reg::Ecx, 9),
    f("fma", 1, Reg::Ecx, 12),
    f("cx16", 1, Reg::Ecx, 13),
    f("pdcm", 1, Reg::Ecx, 15),
    f("pcid", 1, Reg::Ecx, 17),
    f("sse4_1", 1, Reg::Ecx, 19),
    f("sse4_2", 1, Reg::Ecx, 20),
    f("x2apic", 1, Reg::Ecx, 21),
    f("movbe", 1, Reg::Ecx, 22),
    f("popcnt", 1, Reg::Ecx, 23),
    f("tsc_deadline_timer", 1, Reg::Ecx, 24),
    f("aes", 1, Reg::Ecx, 25),
    f("xsave", 1, Reg::Ecx, 26),
    f("avx", 1, Reg::Ecx, 28),
    f("f16c", 1, Reg::Ecx, 29),
    f("rdrand", 1, Reg::Ecx, 30),
    // Leaf 1 EDX.
    f("mce", 1, Reg::Edx, 7),
    f("mtrr", 1, Reg::Edx, 12),
    f("pge", 1, Reg::Edx, 13),
    f("mca", 1, Reg::Edx, 14),
    f("pat", 1, Reg::Edx, 16),
    f("pse36", 1, Reg::Edx, 17),
    f("clflush", 1, Reg::Edx, 19),
    f("mmx", 1, Reg::Edx, 23),
    f("ss", 1, Reg::Edx, 27),
    // Leaf 7.0 EBX.
    f("fsgsbase", 7, Reg::Ebx, 0),
    f("tsc_adjust", 7, Reg::Ebx, 1),
    f("sgx", 7, Reg::Ebx, 2),
    f("bmi1", 7, Reg::Ebx, 3),
    f("hle", 7, Reg::Ebx, 4),
    f("avx2", 7, Reg::Ebx, 5),
    f("smep", 7, Reg::Ebx, 7),
    f("bmi2", 7, Reg::Ebx, 8),
    f("erms", 7, Reg::Ebx, 9),
    f("invpcid", 7, Reg::Ebx, 10),
    f("rtm", 7, Reg::Ebx, 11),
    f("mpx", 7, Reg::Ebx, 14),
    f("avx512f", 7, Reg::Ebx, 16),
    f("avx512dq", 7, Reg::Ebx, 17),
    f("rdseed", 7, Reg::Ebx, 18),
    f("adx", 7, Reg::Ebx, 19),
    f("smap", 7, Reg::Ebx, 20),
    f("avx512ifma", 7, Reg::Ebx, 21),
    f("clflushopt", 7, Reg::Ebx, 23),
    f("clwb", 7, Reg::Ebx, 24),
    f("avx512pf", 7, Reg::Ebx, 26),
    f("avx512er", 7, Reg::Ebx, 27),
    f("avx512cd", 7, Reg::Ebx, 28),
    f("sha_ni", 7, Reg::Ebx, 29),
    f("avx512bw", 7, Reg::Ebx, 30),
    f("avx512vl", 7, Reg::Ebx, 31),
    // Leaf 7.0 ECX.
    f("avx512vbmi", 7, Reg::Ecx, 1),
    f("umip", 7, Reg::Ecx, 2),
    f("pku", 7, Reg::Ecx, 3),
    f("waitpkg", 7, Reg::Ecx, 5),
    f("avx512_vbmi2", 7, Reg::Ecx, 6),
    f("gfni", 7, Reg::Ecx, 8),
    f("vaes", 7, Reg::Ecx, 9),
    f("vpclmulqdq", 7, Reg::Ecx, 10),
    f("avx512_vnni", 7, Reg::Ecx, 11),
    f("avx512_bitalg", 7, Reg::Ecx, 12),
    f("avx512_vpopcntdq", 7, Reg::Ecx, 14),
    f("la57", 7, Reg::Ecx, 16),
    f("rdpid", 7, Reg::Ecx, 22),
    f("movdiri", 7, Reg::Ecx, 27),
    f("movdir64b", 7, Reg::Ecx, 28),
    // Leaf 7.0 EDX.
    f("avx512_4vnniw", 7, Reg::Edx, 2),
    f("avx512_4fmaps", 7, Reg::Edx, 3),
    f("fsrm", 7, Reg::Edx, 4),
    f("md_clear", 7, Reg::Edx, 10),
    f("serialize", 7, Reg::Edx, 14),
    f("tsxldtrk", 7, Reg::Edx, 16),
    f("amx_bf16", 7, Reg::Edx, 22),
    f("avx512_fp16", 7, Reg::Edx, 23),
    f("amx_tile", 7, Reg::Edx, 24),
    f("amx_int8", 7, Reg::Edx, 25),
    f("arch_capabilities", 7, Reg::Edx, 29),
    // Leaf 0x80000001 ECX.
    f("lahf_lm", EXT, Reg::Ecx, 0),
    f("svm", EXT, Reg::Ecx, 2),
    f("abm", EXT, Reg::Ecx, 5),
    f("lzcnt", EXT, Reg::Ecx, 5),
    f("sse4a", EXT, Reg::Ecx, 6),
    f("misalignsse", EXT, Reg::Ecx, 7),
    f("3dnowprefetch", EXT, Reg::Ecx, 8),
    f("xop", EXT, Reg::Ecx, 11),
    f("fma4", EXT, Reg::Ecx, 16),
    f("tbm", EXT, Reg::Ecx, 21),
    f("topoext", EXT, Reg::Ecx, 22),
    // Leaf 0x80000001 EDX.
    f("nx", EXT, Reg::Edx, 20),
    f("mmxext", EXT, Reg::Edx, 22),
    f("fxsr_opt", EXT, Reg::Edx, 25),
    f("pdpe1gb", EXT, Reg::Edx, 26),
    f("rdtscp", EXT, Reg::Edx, 27),
    f("3dnowext", EXT, Reg::Edx, 30),
    f("3dnow", EXT, Reg::Edx, 31),
];

/// (parent, child): clearing the parent clears the child too (a subset of Linux's
/// `cpuid-deps.c`), so the guest never sees a feature without its prerequisite.
const DEPENDENCIES: &[(&str, &str)] = &[
    ("xsave", "avx"),
    ("xsave", "pku"),
    ("xsave", "amx_tile"),
    ("avx", "avx2"),
    ("avx", "fma"),
    ("avx", "f16c"),
    ("avx", "fma4"),
    ("avx", "xop"),
    ("avx", "vaes"),
    ("avx", "vpclmulqdq"),
    ("avx", "avx512f"),
    ("avx512f", "avx512dq"),
    ("avx512f", "avx512ifma"),
    ("avx512f", "avx512pf"),
    ("avx512f", "avx512er"),
    ("avx512f", "avx512cd"),
    ("avx512f", "avx512bw"),
    ("avx512f", "avx512vl"),
    ("avx512f", "avx512vbmi"),
    ("avx512f", "avx512_vbmi2"),
    ("avx512f", "avx512_vnni"),
    ("avx512f", "avx512_bitalg"),
    ("avx512f", "avx512_vpopcntdq"),
    ("avx512f", "avx512_4vnniw"),
    ("avx512f", "avx512_4fmaps"),
    ("avx512f", "avx512_fp16"),
    ("amx_tile", "amx_bf16"),
    ("amx_tile", "amx_int8"),
    ("sse4_1", "sse4_2"),
    ("ssse3", "sse4_1"),
    ("pni", "ssse3"),
    ("sse3", "ssse3"),
];

fn find_feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// A user-chosen set of CPU features to hide from the guest, e.g. parsed from
/// `"-avx2,-x2apic,-pdpe1gb"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureMask {
    cleared: Vec<String>,
}

impl FeatureMask {
    /// A mask that hides nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Names of the features the user asked to hide (validated, lower case).
    pub fn cleared(&self) -> &[String] {
        &self.cleared
    }

    /// The full set to clear: the named features plus everything depending on them.
    fn closure(&self) -> Vec<&'static Feature> {
        let mut names: Vec<&'static str> = self
            .cleared
            .iter()
            .filter_map(|n| find_feature(n).map(|f| f.name))
            .collect();
        loop {
            let before = names.len();
            for (parent, child) in DEPENDENCIES {
                if names.contains(parent) && !names.contains(child) {
                    names.push(child);
                }
            }
            if names.len() == before {
                break;
            }
        }
        // A name may have aliases (pni/sse3, abm/lzcnt): clear every entry with that bit.
        FEATURES
            .iter()
            .filter(|feat| {
                names.iter().any(|n| {
                    find_feature(n).is_some_and(|named| {
                        named.leaf == feat.leaf
                            && named.subleaf == feat.subleaf
                            && named.reg == feat.reg
                            && named.bit == feat.bit
                    })
                })
            })
            .collect()
    }

    /// Whether the mask (with dependencies) hides `name`.
    pub fn hides(&self, name: &str) -> bool {
        self.closure().iter().any(|f| f.name == name)
    }
}

impl FromStr for FeatureMask {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let mut cleared = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let lower = item.to_ascii_lowercase();
            let name = match lower.strip_prefix('-') {
                Some(name) => name.trim(),
                None => {
                    let name = lower.strip_prefix('+').unwrap_or(&lower).trim().to_string();
                    return Err(match find_feature(&name) {
                        Some(_) => Error::CannotAddFeature(name),
                        None => Error::UnknownFeature(name),
                    });
                }
            };
            if find_feature(name).is_none() {
                return Err(Error::UnknownFeature(name.to_string()));
            }
            if !cleared.iter().any(|c| c == name) {
                cleared.push(name.to_string());
            }
        }
        Ok(FeatureMask { cleared })
    }
}

impl fmt::Display for FeatureMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.cleared.iter().map(|n| format!("-{n}")).collect();
        write!(f, "{}", items.join(","))
    }
}

/// Per-VM CPUID settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidConfig {
    /// Number of vCPUs (all in one package, one thread per core).
    pub vcpu_count: u32,
    /// Hide the PV features that use hypercalls (see [`KVM_HYPERCALL_FEATURES`]).
    pub hide_pv_hypercalls: bool,
    /// Features the user hid.
    pub feature_mask: FeatureMask,
}

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

fn entries_mut(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
) -> impl Iterator<Item = &mut kvm_cpuid_entry2> {
    entries.iter_mut().filter(move |e| e.function == function)
}

fn entry_mut(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
}

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// Bits needed to hold `count` distinct IDs (ceil(log2(count))).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    find(entries, 0, 0).is_some_and(|e| {
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&e.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&e.ecx.to_le_bytes());
        &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine"
    })
}

/// Builds the CPUID of vCPU `vcpu_id` (also its APIC ID) from `supported`
/// (`Kvm::get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)`). Pure; the result goes to
/// `VcpuFd::set_cpuid2`.
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u32, config: &CpuidConfig) -> Result<CpuId> {
    let count = config.vcpu_count;
    if count == 0 {
        return Err(Error::NoVcpus);
    }
    if vcpu_id >= count {
        return Err(Error::VcpuOutOfRange { id: vcpu_id, count });
    }
    let mut entries = supported.as_slice().to_vec();
    apply_feature_mask(&mut entries, &config.feature_mask);
    set_leaf1(&mut entries, vcpu_id, count);
    set_leaf4(&mut entries, count);
    set_extended_topology(&mut entries, vcpu_id, count);
    if is_amd(&entries) {
        set_amd_topology(&mut entries, vcpu_id, count);
    }
    set_kvm_leaves(&mut entries, config.hide_pv_hypercalls);
    CpuId::from_entries(&entries).map_err(|_| Error::TooManyEntries)
}

fn apply_feature_mask(entries: &mut [kvm_cpuid_entry2], mask: &FeatureMask) {
    let cleared = mask.closure();
    for feat in &cleared {
        if let Some(entry) = entry_mut(entries, feat.leaf, feat.subleaf) {
            *reg_mut(entry, feat.reg) &= !(1u32 << feat.bit);
        }
    }
    let hidden = |name: &str| cleared.iter().any(|f| f.name == name);
    if hidden("xsave") {
        if let Some(leaf1) = entry_mut(entries, 1, 0) {
            leaf1.ecx &= !LEAF1_ECX_OSXSAVE;
        }
        for e in entries_mut(entries, 0xd) {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        return;
    }
    // XCR0 components: 2 = YMM (AVX); 5..=7 = AVX-512 opmask/ZMM_Hi256/Hi16_ZMM;
    // 17, 18 = AMX tile config/data.
    let mut drop_components: Vec<u32> = Vec::new();
    if hidden("avx") {
        drop_components.push(2);
    }
    if hidden("avx512f") {
        drop_components.extend([5, 6, 7]);
    }
    if hidden("amx_tile") {
        drop_components.extend([17, 18]);
    }
    if drop_components.is_empty() {
        return;
    }
    for &c in &drop_components {
        if let Some(e) = entry_mut(entries, 0xd, c) {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
    }
    let Some(leaf) = find(entries, 0xd, 0).copied() else {
        return;
    };
    let mut xcr0 = u64::from(leaf.eax) | (u64::from(leaf.edx) << 32);
    for &c in &drop_components {
        xcr0 &= !(1u64 << c);
    }
    // Legacy area + XSAVE header, then each remaining user component's offset + size.
    let mut size = 512 + 64;
    for c in 2..64u32 {
        if xcr0 & (1u64 << c) != 0 {
            if let Some(e) = find(entries, 0xd, c) {
                size = size.max(e.ebx.saturating_add(e.eax));
            }
        }
    }
    if let Some(e) = entry_mut(entries, 0xd, 0) {
        e.eax = xcr0 as u32;
        e.edx = (xcr0 >> 32) as u32;
        e.ecx = size;
        e.ebx = e.ebx.min(size);
    }
}

fn set_leaf1(entries: &mut [kvm_cpuid_entry2], vcpu_id: u32, count: u32) {
    if let Some(e) = entry_mut(entries, 1, 0) {
        let logical = count.next_power_of_two().min(0xff);
        e.ebx = (e.ebx & 0x0000_ffff) | ((vcpu_id & 0xff) << 24) | (logical << 16);
        if count > 1 {
            e.edx |= LEAF1_EDX_HTT;
        } else {
            e.edx &= !LEAF1_EDX_HTT;
        }
        e.ecx |= LEAF1_ECX_HYPERVISOR;
    }
}

fn set_leaf4(entries: &mut [kvm_cpuid_entry2], count: u32) {
    let cores = (count - 1).min(63);
    for e in entries_mut(entries, 4) {
        if e.eax & 0x1f == 0 {
            continue; // null cache descriptor ends the list
        }
        let level = (e.eax >> 5) & 0x7;
        // One thread per core: L1/L2 are private, L3 is shared by the package.
        let sharing = if level >= 3 {
            (count - 1).min(0xfff)
        } else {
            0
        };
        e.eax = (e.eax & 0x3fff) | (sharing << 14) | (cores << 26);
    }
}

/// Leaf 0xB / 0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

fn topology_entries(function: u32, vcpu_id: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: vcpu_id,
        ..Default::default()
    };
    [
        entry(0, 0, 1, LEVEL_TYPE_SMT),
        entry(1, id_bits(count), count.min(0xffff), LEVEL_TYPE_CORE),
        entry(2, 0, 0, 0),
    ]
}

fn set_extended_topology(entries: &mut Vec<kvm_cpuid_entry2>, vcpu_id: u32, count: u32) {
    let has_1f = entries.iter().any(|e| e.function == 0x1f);
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);
    entries.extend(topology_entries(0xb, vcpu_id, count));
    if has_1f {
        entries.extend(topology_entries(0x1f, vcpu_id, count));
    }
    if let Some(leaf0) = entry_mut(entries, 0, 0) {
        leaf0.eax = leaf0.eax.max(0xb);
    }
}

fn set_amd_topology(entries: &mut [kvm_cpuid_entry2], vcpu_id: u32, count: u32) {
    if let Some(e) = entry_mut(entries, 0x8000_0008, 0) {
        // ECX[15:12] ApicIdSize, ECX[7:0] NC (cores - 1).
        e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1).min(0xff);
    }
    // Cache topology (AMD's leaf 4): EAX bits 25:14 = threads sharing the cache - 1.
    for e in entries_mut(entries, 0x8000_001d) {
        if e.eax & 0x1f == 0 {
            continue;
        }
        let level = (e.eax >> 5) & 0x7;
        let sharing = if level >= 3 {
            (count - 1).min(0xfff)
        } else {
            0
        };
        e.eax = (e.eax & !(0xfff << 14)) | (sharing << 14);
    }
    if let Some(e) = entry_mut(entries, 0x8000_001e, 0) {
        e.eax = vcpu_id;
        // EBX[15:8] threads per core - 1 = 0, EBX[7:0] core ID.
        e.ebx = (e.ebx & !0xffff) | (vcpu_id & 0xff);
        // ECX[10:8] nodes per processor - 1 = 0, ECX[7:0] node ID = 0.
        e.ecx &= !0x7ff;
    }
}

fn set_kvm_leaves(entries: &mut Vec<kvm_cpuid_entry2>, hide_pv_hypercalls: bool) {
    let sig = b"KVMKVMKVM\0\0\0";
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    let signature = kvm_cpuid_entry2 {
        function: KVM_CPUID_SIGNATURE,
        eax: KVM_CPUID_FEATURES,
        ebx: word(0),
        ecx: word(4),
        edx: word(8),
        ..Default::default()
    };
    match entry_mut(entries, KVM_CPUID_SIGNATURE, 0) {
        Some(e) => *e = signature,
        None => entries.push(signature),
    }
    if entry_mut(entries, KVM_CPUID_FEATURES, 0).is_none() {
        entries.push(kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            ..Default::default()
        });
    }
    if hide_pv_hypercalls {
        if let Some(e) = entry_mut(entries, KVM_CPUID_FEATURES, 0) {
            for bit in KVM_HYPERCALL_FEATURES {
                e.eax &= !(1u32 << bit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendor_entry(vendor: &[u8; 12], max_leaf: u32) -> kvm_cpuid_entry2 {
        let w =
            |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
        kvm_cpuid_entry2 {
            function: 0,
            eax: max_leaf,
            ebx: w(0),
            edx: w(4),
            ecx: w(8),
            ..Default::default()
        }
    }

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A plausible host: Intel, with leaf 4 caches, 0xB, 0x1F, XSAVE/AVX/AVX-512, KVM leaves.
    fn intel_host() -> CpuId {
        let entries = vec![
            vendor_entry(b"GenuineIntel", 0x1f),
            // leaf 1: AVX, XSAVE, OSXSAVE, x2APIC; EDX: HTT set by host; EBX: CLFLUSH 8.
            leaf(1, 0, 0x806f8, 0x0040_0800, 0xfffa_3203, 0x1f8b_fbff),
            leaf(4, 0, 0x1c00_4121, 0x02c0_003f, 0x3f, 0), // L1d
            leaf(4, 1, 0x1c00_4122, 0x01c0_003f, 0x3f, 0), // L1i
            leaf(4, 2, 0x1c00_4143, 0x03c0_003f, 0x7ff, 0), // L2
            leaf(4, 3, 0x1c03_c163, 0x03c0_003f, 0xdfff, 4), // L3
            leaf(4, 4, 0, 0, 0, 0),
            leaf(7, 0, 0, 0xf1bf_07ab, 0x1b4_0f5e, 0xfc1c_4410),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0xb, 1, 7, 112, 0x201, 7),
            leaf(0xd, 0, 0xe7, 0x988, 0xa88, 0),
            leaf(0xd, 1, 0xf, 0, 0, 0),
            leaf(0xd, 2, 0x100, 0x240, 0, 0),
            leaf(0xd, 5, 0x40, 0x440, 0, 0),
            leaf(0xd, 6, 0x200, 0x480, 0, 0),
            leaf(0xd, 7, 0x400, 0x680, 0, 0),
            leaf(0x1f, 0, 1, 2, 0x100, 7),
            leaf(0x8000_0001, 0, 0, 0, 0x121, 0x2c10_0800),
            leaf(0x8000_0008, 0, 0x3030, 0, 0, 0),
            leaf(KVM_CPUID_SIGNATURE, 0, 0x4000_0001, 0, 0, 0),
            leaf(KVM_CPUID_FEATURES, 0, 0x01ff_ffff, 0, 0, 0),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn amd_host() -> CpuId {
        let entries = vec![
            vendor_entry(b"AuthenticAMD", 0x10),
            leaf(1, 0, 0xa00f11, 0x0010_0800, 0x7ed8_3203, 0x178b_fbff),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x0000_700f, 0),
            leaf(0x8000_001d, 0, 0x0000_4121, 0x01c0_003f, 0x3f, 0), // L1d, 2 sharing
            leaf(0x8000_001d, 3, 0x0003_c163, 0x03c0_003f, 0x7fff, 1), // L3, 16 sharing
            leaf(0x8000_001e, 0, 5, 0x0000_0105, 0x0000_0103, 0),
            leaf(KVM_CPUID_FEATURES, 0, 0x01ff_ffff, 0, 0, 0),
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    fn config(count: u32) -> CpuidConfig {
        CpuidConfig {
            vcpu_count: count,
            hide_pv_hypercalls: false,
            feature_mask: FeatureMask::empty(),
        }
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *find(cpuid.as_slice(), function, index).expect("leaf present")
    }

    #[test]
    fn test_vcpu_cpuid_one_vcpu_topology() {
        let cpuid = vcpu_cpuid(&intel_host(), 0, &config(1)).unwrap();

        let l1 = get(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_HYPERVISOR, LEAF1_ECX_HYPERVISOR);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        let l4 = get(&cpuid, 4, 3);
        assert_eq!(l4.eax >> 26, 0);
        assert_eq!((l4.eax >> 14) & 0xfff, 0);
        let smt = get(&cpuid, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 0));
        let core = get(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (0, 1, 0x201, 0));
        let end = get(&cpuid, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8 & 0xff), (0, 0));
    }

    #[test]
    fn test_vcpu_cpuid_four_vcpus_topology() {
        let cpuid = vcpu_cpuid(&intel_host(), 3, &config(4)).unwrap();

        let l1 = get(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, LEAF1_EDX_HTT);
        let l1d = get(&cpuid, 4, 0);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!(l1d.eax & 0x3fff, 0x0121, "cache type/level kept");
        let l3 = get(&cpuid, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        let core = get(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        let core_1f = get(&cpuid, 0x1f, 1);
        assert_eq!((core_1f.eax, core_1f.ebx, core_1f.edx), (2, 4, 3));
        assert_eq!(
            cpuid
                .as_slice()
                .iter()
                .filter(|e| e.function == 0xb)
                .count(),
            3
        );
    }

    #[test]
    fn test_vcpu_cpuid_sixty_four_vcpus_topology() {
        let cpuid = vcpu_cpuid(&intel_host(), 63, &config(64)).unwrap();

        let l1 = get(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 63);
        assert_eq!((l1.ebx >> 16) & 0xff, 64);
        assert_eq!(get(&cpuid, 4, 0).eax >> 26, 63);
        let core = get(&cpuid, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (6, 64, 63));
        assert_eq!(get(&cpuid, 0xb, 0).edx, 63);
    }

    #[test]
    fn test_vcpu_cpuid_amd_sets_core_count_leaves() {
        let cpuid = vcpu_cpuid(&amd_host(), 2, &config(4)).unwrap();

        let l8 = get(&cpuid, 0x8000_0008, 0);
        assert_eq!(l8.ecx & 0xff, 3);
        assert_eq!((l8.ecx >> 12) & 0xf, 2);
        assert_eq!((get(&cpuid, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
        let l3 = get(&cpuid, 0x8000_001d, 3).eax;
        assert_eq!((l3 >> 14) & 0xfff, 3);
        assert_eq!(l3 & 0x3fff, 0x0163, "cache type/level kept");
        let l1e = get(&cpuid, 0x8000_001e, 0);
        assert_eq!(l1e.eax, 2);
        assert_eq!(l1e.ebx & 0xffff, 2);
        assert_eq!(get(&cpuid, 0, 0).eax, 0x10);
        assert_eq!(get(&cpuid, 0xb, 1).ebx, 4);
    }

    #[test]
    fn test_vcpu_cpuid_intel_leaves_0x80000008_ecx_alone() {
        let cpuid = vcpu_cpuid(&intel_host(), 0, &config(4)).unwrap();

        assert_eq!(get(&cpuid, 0x8000_0008, 0).ecx, 0);
    }

    #[test]
    fn test_vcpu_cpuid_kvm_signature_present() {
        let cpuid = vcpu_cpuid(&amd_host(), 0, &config(1)).unwrap();

        let sig = get(&cpuid, KVM_CPUID_SIGNATURE, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, KVM_CPUID_FEATURES);
    }

    #[test]
    fn test_vcpu_cpuid_hide_pv_hypercalls_clears_bits() {
        let cfg = CpuidConfig {
            hide_pv_hypercalls: true,
            ..config(2)
        };

        let cpuid = vcpu_cpuid(&intel_host(), 0, &cfg).unwrap();

        let feat = get(&cpuid, KVM_CPUID_FEATURES, 0).eax;
        for bit in [7, 11, 13, 16] {
            assert_eq!(feat & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(feat & 1, 1, "kvm-clock stays");
        assert_eq!(feat & (1 << 3), 1 << 3, "kvm-clock2 stays");
    }

    #[test]
    fn test_vcpu_cpuid_keeps_pv_bits_by_default() {
        let cpuid = vcpu_cpuid(&intel_host(), 0, &config(2)).unwrap();

        assert_eq!(get(&cpuid, KVM_CPUID_FEATURES, 0).eax, 0x01ff_ffff);
    }

    #[test]
    fn test_vcpu_cpuid_zero_vcpus_is_error() {
        assert_eq!(
            vcpu_cpuid(&intel_host(), 0, &config(0)).unwrap_err(),
            Error::NoVcpus
        );
    }

    #[test]
    fn test_vcpu_cpuid_id_out_of_range_is_error() {
        assert_eq!(
            vcpu_cpuid(&intel_host(), 4, &config(4)).unwrap_err(),
            Error::VcpuOutOfRange { id: 4, count: 4 }
        );
    }

    #[test]
    fn test_feature_mask_parse_valid_list() {
        let mask: FeatureMask = "-avx2, -X2APIC,-pdpe1gb,".parse().unwrap();

        assert_eq!(mask.cleared(), ["avx2", "x2apic", "pdpe1gb"]);
        assert_eq!(mask.to_string(), "-avx2,-x2apic,-pdpe1gb");
    }

    #[test]
    fn test_feature_mask_parse_unknown_name_is_error() {
        let err = "-avx2,-frobnicate".parse::<FeatureMask>().unwrap_err();

        assert_eq!(err, Error::UnknownFeature("frobnicate".into()));
        assert_eq!(err.to_string(), "Unknown CPU feature \"frobnicate\"");
    }

    #[test]
    fn test_feature_mask_parse_add_is_error() {
        let err = "+avx2".parse::<FeatureMask>().unwrap_err();

        assert_eq!(err, Error::CannotAddFeature("avx2".into()));
    }

    #[test]
    fn test_feature_mask_parse_empty_is_empty() {
        let mask: FeatureMask = "".parse().unwrap();

        assert_eq!(mask, FeatureMask::empty());
    }

    #[test]
    fn test_feature_mask_clears_bits_in_leaves_1_7_ext() {
        let cfg = CpuidConfig {
            feature_mask: "-avx2,-x2apic,-pdpe1gb".parse().unwrap(),
            ..config(1)
        };

        let cpuid = vcpu_cpuid(&intel_host(), 0, &cfg).unwrap();

        assert_eq!(get(&cpuid, 7, 0).ebx & (1 << 5), 0);
        assert_eq!(get(&cpuid, 1, 0).ecx & (1 << 21), 0);
        assert_eq!(get(&cpuid, 0x8000_0001, 0).edx & (1 << 26), 0);
        assert_eq!(get(&cpuid, 1, 0).ecx & (1 << 28), 1 << 28, "avx kept");
    }

    #[test]
    fn test_feature_mask_avx_clears_dependents_and_ymm_state() {
        let cfg = CpuidConfig {
            feature_mask: "-avx".parse().unwrap(),
            ..config(1)
        };

        let cpuid = vcpu_cpuid(&intel_host(), 0, &cfg).unwrap();

        assert_eq!(get(&cpuid, 1, 0).ecx & (1 << 28), 0);
        assert_eq!(get(&cpuid, 1, 0).ecx & (1 << 12), 0, "fma");
        assert_eq!(get(&cpuid, 7, 0).ebx & (1 << 5), 0, "avx2");
        assert_eq!(get(&cpuid, 7, 0).ebx & (1 << 16), 0, "avx512f");
        assert_eq!(get(&cpuid, 7, 0).ebx & (1 << 31), 0, "avx512vl");
        let xsave = get(&cpuid, 0xd, 0);
        assert_eq!(xsave.eax, 0x3, "only x87 and SSE left");
        assert_eq!(xsave.ecx, 576);
        assert_eq!(get(&cpuid, 0xd, 2).eax, 0);
        assert_eq!(get(&cpuid, 1, 0).ecx & (1 << 26), 1 << 26, "xsave kept");
    }

    #[test]
    fn test_feature_mask_avx512f_shrinks_xsave_area_to_ymm() {
        let cfg = CpuidConfig {
            feature_mask: "-avx512f".parse().unwrap(),
            ..config(1)
        };

        let cpuid = vcpu_cpuid(&intel_host(), 0, &cfg).unwrap();

        let xsave = get(&cpuid, 0xd, 0);
        assert_eq!(xsave.eax, 0x7);
        assert_eq!(xsave.ecx, 0x240 + 0x100);
        assert_eq!(get(&cpuid, 1, 0).ecx & (1 << 28), 1 << 28, "avx kept");
    }

    #[test]
    fn test_feature_mask_xsave_clears_leaf_d_and_osxsave() {
        let cfg = CpuidConfig {
            feature_mask: "-xsave".parse().unwrap(),
            ..config(1)
        };

        let cpuid = vcpu_cpuid(&intel_host(), 0, &cfg).unwrap();

        let l1 = get(&cpuid, 1, 0);
        assert_eq!(l1.ecx & ((1 << 26) | (1 << 27) | (1 << 28)), 0);
        for e in cpuid.as_slice().iter().filter(|e| e.function == 0xd) {
            assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
        }
    }

    #[test]
    fn test_feature_mask_alias_clears_same_bit() {
        let mask: FeatureMask = "-lzcnt".parse().unwrap();

        assert!(mask.hides("abm"));
    }

    #[test]
    fn test_id_bits_values() {
        assert_eq!([1, 2, 3, 4, 5, 64, 65].map(id_bits), [0, 1, 2, 2, 3, 6, 7]);
    }
}
