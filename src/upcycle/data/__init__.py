"""Text -> token files (`upcycle data prepare`) and the deterministic domain-mixture loader."""
