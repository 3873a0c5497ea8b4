//! PCI helpers: configuration space, BARs, capabilities (MSI, MSI-X).
