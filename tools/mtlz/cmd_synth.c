/* cmd_synth.c - placeholder while it is being written (this session). */
#include "cli.h"

int cmd_synth(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	cli_error("synth: not written yet");
	return EXIT_RUNTIME;
}
