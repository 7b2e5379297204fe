//! Raw bindings to UCX's `libucp` (and the `ucs_status_string` it re-exports
//! from `libucs`), for UCX 1.13 and later.
//!
//! The bindings are generated once by `generate.sh` (bindgen against
//! Debian's `libucx-dev` 1.13.1) and committed. Nothing links against UCX:
//! [`UcpLib::new`] opens the shared library at run time, so code using this
//! crate builds and runs where UCX is absent and can fall back.
//!
//! What C defines as macros or inline functions is not in the library and is
//! written out below: `ucp_init` (call [`UcpLib::ucp_init_version`] with
//! [`UCP_API_MAJOR`]/[`UCP_API_MINOR`]), the status-pointer tests and the
//! datatype constructors.

mod bindings;
pub use bindings::*;

/// `UCS_PTR_IS_ERR`: the pointer a non-blocking call returned encodes an error.
pub fn ptr_is_err(p: *const std::ffi::c_void) -> bool {
    (p as usize) >= (ucs_status_t_UCS_ERR_LAST as isize as usize)
}

/// `UCS_PTR_IS_PTR`: the pointer is a request handle (not NULL, not an error).
pub fn ptr_is_ptr(p: *const std::ffi::c_void) -> bool {
    (p as usize).wrapping_sub(1) < (ucs_status_t_UCS_ERR_LAST as isize as usize).wrapping_sub(1)
}

/// `UCS_PTR_STATUS`: the status a non-blocking call's return value encodes
/// (`UCS_OK` for NULL, `UCS_INPROGRESS` for a request).
pub fn ptr_status(p: *const std::ffi::c_void) -> ucs_status_t {
    if ptr_is_ptr(p) {
        ucs_status_t_UCS_INPROGRESS
    } else {
        p as isize as ucs_status_t
    }
}

/// `ucp_dt_make_contig(1)`: a contiguous buffer of bytes.
pub const DATATYPE_BYTES: ucp_datatype_t = (1 << ucp_dt_type_UCP_DATATYPE_SHIFT) as ucp_datatype_t
    | ucp_dt_type_UCP_DATATYPE_CONTIG as ucp_datatype_t;

/// `ucp_dt_make_iov()`: a list of [`ucp_dt_iov_t`].
pub const DATATYPE_IOV: ucp_datatype_t = ucp_dt_type_UCP_DATATYPE_IOV as ucp_datatype_t;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_pointers_decode_like_the_c_macros() {
        let err = ucs_status_t_UCS_ERR_NO_MEMORY as isize as *const std::ffi::c_void;
        assert!(ptr_is_err(err));
        assert!(!ptr_is_ptr(err));
        assert_eq!(ptr_status(err), ucs_status_t_UCS_ERR_NO_MEMORY);
        assert!(!ptr_is_err(std::ptr::null()));
        assert!(!ptr_is_ptr(std::ptr::null()));
        assert_eq!(ptr_status(std::ptr::null()), ucs_status_t_UCS_OK);
        let req = 0x1000usize as *const std::ffi::c_void;
        assert!(ptr_is_ptr(req) && !ptr_is_err(req));
        assert_eq!(ptr_status(req), ucs_status_t_UCS_INPROGRESS);
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_crash() {
        // SAFETY: opening a path that does not exist runs no library code.
        let r = unsafe { UcpLib::new("/nonexistent/libucp.so.0") };
        assert!(r.is_err());
    }
}
