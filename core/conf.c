/* conf.c - being written (see conf.h). */
