//! Shared-storage mode: the journal lives on a network share (AWS EFS, Azure Files over SMB or
//! NFS, any NFS or CIFS server) mounted on both VMs. [`mount`] turns the config into the mount
//! command that `mount.artemis-sync` runs at boot, [`mountinfo`] reads what the kernel actually
//! mounted, [`lock_safety`] judges whether a lock on that mount excludes the other VM, [`lock`]
//! and [`lease`] are the two halves of mutual exclusion on the share, and [`agent`] is the
//! daemon that holds them (its share worker doing every operation on the share) and runs the
//! node only while it does.

pub mod agent;
pub mod lease;
pub mod lock;
pub mod lock_safety;
pub mod mount;
pub mod mountinfo;
mod share_worker;
