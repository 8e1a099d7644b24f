"""evmm-oci: an OCI runtime with runc's command line that runs each container in its own microVM."""
