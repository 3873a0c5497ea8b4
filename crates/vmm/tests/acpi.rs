//! ACPI tables checked by an independent parser: the generated tables are dumped to
//! files and disassembled with ACPICA's `iasl -d` (Debian `acpica-tools`, installed by
//! `scripts/test.sh`), which must report no errors and show the objects the VMM put in.
//! Without `iasl` the test SKIPs loudly (and fails under `CI=true`). The RSDP is not
//! given to `iasl` (it does not take a bare RSDP file); its checksums and pointer are
//! checked by the unit tests in `src/acpi/tests.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use nestio_vmm::acpi::{AcpiConfig, AcpiTables, ACPI_BASE};
use nestio_vmm::irqchip::x86::IntxRouting;

fn iasl_or_skip() -> bool {
    match Command::new("iasl").arg("-v").output() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but iasl cannot run ({e}): install acpica-tools");
            }
            eprintln!("SKIP: iasl not found ({e}); `apt-get install acpica-tools` to run the ACPI oracle test");
            false
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nestio-acpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Disassemble `bytes` (written as `dir/name.dat`); returns the .dsl text and the
/// tool's own output.
fn disassemble(dir: &Path, name: &str, bytes: &[u8]) -> (String, String) {
    let dat = dir.join(format!("{name}.dat"));
    std::fs::write(&dat, bytes).unwrap();
    let out = Command::new("iasl")
        .current_dir(dir)
        .arg("-d")
        .arg(&dat)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name} failed:\n{log}");
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
        .unwrap_or_else(|e| panic!("iasl wrote no {name}.dsl ({e}):\n{log}"));
    (dsl, log)
}

fn assert_clean(name: &str, dsl: &str, log: &str) {
    for text in [dsl, log] {
        for line in text.lines() {
            let l = line.to_ascii_lowercase();
            let errors = l.contains("error") && !l.contains("0 errors");
            assert!(
                !errors && !l.contains("invalid") && !l.contains("incorrect"),
                "{name}: iasl complains: {line}\n--- log ---\n{log}\n--- dsl ---\n{dsl}"
            );
            assert!(
                !l.contains("warning") || l.contains("0 warnings"),
                "{name}: iasl warns: {line}\n--- log ---\n{log}"
            );
        }
    }
}

fn has(dsl: &str, needle: &str, what: &str) {
    assert!(
        dsl.contains(needle),
        "{what}: {needle:?} missing from:\n{dsl}"
    );
}

#[test]
fn iasl_disassembles_every_table_without_errors() {
    if !iasl_or_skip() {
        return;
    }
    let cpus = 2;
    let t =
        AcpiTables::build(ACPI_BASE, &AcpiConfig::new(cpus, IntxRouting::Pic).unwrap()).unwrap();
    let dir = scratch("tables");
    let mut dsl = std::collections::BTreeMap::new();
    for (sig, name) in [
        (b"XSDT", "xsdt"),
        (b"FACP", "facp"),
        (b"FACS", "facs"),
        (b"APIC", "apic"),
        (b"MCFG", "mcfg"),
        (b"DSDT", "dsdt"),
    ] {
        let (text, log) = disassemble(&dir, name, t.table(sig).unwrap());
        assert_clean(name, &text, &log);
        dsl.insert(name, text);
    }

    let facp = &dsl["facp"];
    has(facp, "Hardware Reduced (V5) : 0", "full FADT profile");
    has(facp, "SCI Interrupt : 0009", "SCI on 9");
    has(facp, "PM1A Event Block Address : 00000600", "PM1a_EVT");
    has(facp, "PM1A Control Block Address : 00000604", "PM1a_CNT");
    has(facp, "PM Timer Block Address : 00000000", "no PM timer");

    let apic = &dsl["apic"];
    assert_eq!(
        apic.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        cpus,
        "one local APIC per vCPU:\n{apic}"
    );
    has(apic, "Subtable Type : 01 [I/O APIC]", "I/O APIC");
    has(apic, "Address : FEC00000", "I/O APIC address");
    has(
        apic,
        "Subtable Type : 02 [Interrupt Source Override]",
        "overrides",
    );
    has(apic, "Subtable Type : 04 [Local APIC NMI]", "NMI on LINT1");
    has(apic, "PC-AT Compatibility : 1", "8259s present");

    let mcfg = &dsl["mcfg"];
    has(mcfg, "Base Address : 00000000E0000000", "MCFG base");
    has(mcfg, "End Bus Number : 00", "bus 0 only");

    let dsdt = &dsl["dsdt"];
    has(dsdt, "Device (PCI0)", "host bridge");
    has(dsdt, "EisaId (\"PNP0A08\")", "PCIe host bridge id");
    has(
        dsdt,
        "EisaId (\"PNP0A03\")",
        "PCI host bridge compatible id",
    );
    has(dsdt, "Name (_PRT, Package", "_PRT");
    // 00:01.0 INTA -> 11, as the VMM wires the first device.
    has(dsdt, "0x0001FFFF", "slot 1 entries");
    assert_eq!(dsdt.matches("0x000BFFFF").count(), 4, "slot 11: four pins");
    has(dsdt, "WordBusNumber", "bus range");
    has(
        dsdt,
        "0xC000,             // Range Minimum",
        "I/O BAR window",
    );
    has(
        dsdt,
        "0xC0000000,         // Range Minimum",
        "MMIO BAR window",
    );
    has(
        dsdt,
        "0xDFFFFFFF,         // Range Maximum",
        "MMIO BAR window end",
    );
    has(dsdt, "EisaId (\"PNP0C02\")", "motherboard resources");
    has(dsdt, "Memory32Fixed (ReadWrite,", "ECAM reserved");
    has(dsdt, "Name (_S5, Package", "S5 sleep type");
    if std::env::var_os("NESTIO_KEEP_ACPI_DUMP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn iasl_notices_a_corrupted_table() {
    // The oracle is only worth something if it sees damage: flip one MADT byte.
    if !iasl_or_skip() {
        return;
    }
    let t = AcpiTables::build(ACPI_BASE, &AcpiConfig::new(1, IntxRouting::Pic).unwrap()).unwrap();
    let mut madt = t.table(b"APIC").unwrap().to_vec();
    madt[47] ^= 0x01; // the first local APIC id
    let dir = scratch("corrupt");
    let (dsl, _) = disassemble(&dir, "apic", &madt);
    assert!(
        dsl.contains("Incorrect checksum"),
        "iasl accepted a corrupted MADT:\n{dsl}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

mod common;

use std::time::Duration;

use nestio_vmm::{StopReason, Vm, VmConfig};

/// Run `cfg` with a watchdog; returns the report and the console text.
fn run_linux(
    cfg: VmConfig,
) -> (
    nestio_vmm::vm::VmReport,
    String,
    Option<std::sync::Arc<nestio_vmm::pci::AssignedDevice>>,
) {
    let (console, buf) = common::console();
    let mut cfg = cfg;
    cfg.console = console;
    let mut vm = Vm::new(cfg).unwrap();
    let dev = vm.pci().devices().first().cloned();
    let handle = vm.handle();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(240)).is_err() {
            handle.stop();
        }
    });
    let report = vm.run().unwrap();
    let _ = tx.send(());
    watchdog.join().unwrap();
    (report, common::text(&buf), dev)
}

/// ACPI trouble the kernel reports about the tables or the AML.
fn acpi_complaints(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| {
            l.contains("ACPI Error")
                || l.contains("ACPI BIOS Error")
                || l.contains("ACPI Warning")
                || l.contains("ACPI BIOS Warning")
                || l.contains("no GSI")
                || l.contains("can't derive routing")
                || l.contains("Incorrect checksum")
        })
        .collect()
}

#[test]
fn linux_with_acpi_pings_through_the_prt_route() {
    acpi_ping("linux_with_acpi_pings_through_the_prt_route", true);
}

#[test]
fn linux_with_acpi_and_the_ioapic_pings_through_the_prt_route() {
    // Without `noapic` Linux routes PCI INTx through the I/O APIC with the GSI it reads
    // from the _PRT and the trigger/polarity of the MADT overrides.
    acpi_ping(
        "linux_with_acpi_and_the_ioapic_pings_through_the_prt_route",
        false,
    );
}

fn acpi_ping(name: &str, noapic: bool) {
    if !common::kvm_or_skip(name) {
        return;
    }
    let Some((kernel, initrd)) = common::guest_linux(name) else {
        return;
    };
    let mut cfg = VmConfig::linux(kernel, Some(initrd));
    cfg.acpi = true;
    if !noapic {
        cfg.cmdline = cfg.cmdline.replace(" noapic", "");
        assert!(!cfg.cmdline.contains("noapic"));
    }
    cfg.devices.push(common::local_e1000());
    let (report, out, dev) = run_linux(cfg);
    assert_eq!(report.outcome, StopReason::GuestExit(0), "console:\n{out}");
    for want in [
        "ACPI: RSDP 0x00000000000F0000 000024 (v02 NESTIO)",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "ACPI: MCFG 0x",
        "ACPI: Interpreter enabled",
        "ACPI: PM: (supports S0 S5)",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
        "pci_bus 0000:00: root bus resource [io  0xc000-0xffff window]",
        "pci_bus 0000:00: root bus resource [mem 0xc0000000-0xdfffffff window]",
        "PCI: MMCONFIG at [mem 0xe0000000-0xe00fffff] reserved in ACPI motherboard resources",
        "PCI: Using ACPI for IRQ routing",
        "e1000 0000:00:01.0 eth0: Intel(R) PRO/1000 Network Connection",
        "NESTIO-PING: ok 3/3",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    if noapic {
        // The 8259s, with the _PRT's GSIs as their lines: PIC mode programs the ELCR
        // for the GSI it finds there (the SCI's 9 at least).
        assert!(
            out.contains("ACPI: Using PIC for interrupt routing"),
            "{out}"
        );
        assert!(out.contains("ACPI: setting ELCR to"), "{out}");
    } else {
        assert!(
            out.contains("ACPI: Using IOAPIC for interrupt routing"),
            "{out}"
        );
        assert!(
            out.contains("ACPI: INT_SRC_OVR (bus 0 bus_irq 11 global_irq 11 low level)"),
            "{out}"
        );
    }
    let bad = acpi_complaints(&out);
    assert!(bad.is_empty(), "ACPI complaints {bad:?} in:\n{out}");
    let bad = nestio_vmm::linux::platform::kernel_problems(&out);
    assert!(bad.is_empty(), "bad kernel lines {bad:?} in:\n{out}");
    assert_eq!(dev.unwrap().intx_gsi(), Some(11));
}

#[test]
fn linux_lists_the_tables_and_powers_off_through_s5() {
    let name = "linux_lists_the_tables_and_powers_off_through_s5";
    if !common::kvm_or_skip(name) {
        return;
    }
    let Some((kernel, initrd)) = common::guest_linux(name) else {
        return;
    };
    let mut cfg = VmConfig::linux(kernel, Some(initrd));
    cfg.acpi = true;
    // busybox as init: list the tables the kernel found, then power off through ACPI
    // (no debug-exit write: only S5 can end the VM with status 0 here).
    cfg.cmdline = format!(
        "{} rdinit=/bin/sh -- -c \"/bin/busybox mount -t sysfs sysfs /sys; \
         echo TABLES: $(/bin/busybox ls /sys/firmware/acpi/tables); /bin/busybox poweroff -f\"",
        nestio_vmm::linux::platform::BASE_CMDLINE
    );
    let (report, out, _) = run_linux(cfg);
    assert_eq!(report.outcome, StopReason::Halted, "console:\n{out}");
    assert_eq!(report.exit_status(), 0);
    let tables = out
        .lines()
        // The echo's line (the kernel's "Command line:" lines also hold the text).
        .find_map(|l| l.trim().strip_prefix("TABLES: ").map(str::to_string))
        .unwrap_or_else(|| panic!("no TABLES line in:\n{out}"));
    for t in ["APIC", "DSDT", "FACP", "FACS", "MCFG"] {
        assert!(
            tables.split_whitespace().any(|x| x == t),
            "{t} not in {tables:?}"
        );
    }
    let bad = acpi_complaints(&out);
    assert!(bad.is_empty(), "ACPI complaints {bad:?} in:\n{out}");
}
