"""Pure control-plane policies: no processes, no gRPC, no shared memory."""
