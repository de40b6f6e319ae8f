"""Privacy: where a user's conversations may go. tiers (the policy, 0 cloud … 3 homomorphic) · remote (rounds on
a remote trainer, tiers 0 and 2) · trainer (the trainer role: a sealed job in, a signed bundle out) · attest
(TEE attestation evidence checked before any data key is released)."""
