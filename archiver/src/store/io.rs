//! The file layer: every byte the store reads or writes goes through [`Vfs`].
