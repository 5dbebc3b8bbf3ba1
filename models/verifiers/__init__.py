"""Rule-based rewards ("verifiers"): answer extraction, math equivalence, format and similarity."""
