/* avro_io.c - being written (see avro_io.h). */
