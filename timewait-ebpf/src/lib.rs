#![no_std]
// Present so that cargo metadata sees a library target; the programs are in main.rs.
