"""x86 specifics: the guest-physical layout, CPU mode set-up, page tables."""
