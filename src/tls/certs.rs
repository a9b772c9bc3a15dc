//! Issuing the cluster's certificates (what `clusterfunk certs` writes). Written by a helper.
