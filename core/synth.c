/* synth.c - placeholder while it is being written (this session). */
