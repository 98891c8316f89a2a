/*
 * test_conf.c - mtlzd's configuration (core/conf.c): defaults, the YAML
 * loader, --set overrides, the cross-key checks and the dump that
 * --check-config prints.
 *
 * Each error case writes a small YAML file whose lines are counted here, and
 * checks that the message names the file position ("line:column", 1-based)
 * and the dotted key, since that is what an operator gets to fix the file
 * with. The suite runs under ASan/UBSan in CI, so the failure paths are also
 * checked for leaks.
 */
#define _GNU_SOURCE
#include "common.h"
#include "conf.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[64];
static char yaml_path[128];
static char dump_path[128];
static mtlz_conf conf;
static char err[1024];

static void setup(void)
{
	snprintf(tmpdir, sizeof(tmpdir), "/tmp/mtlz_conf_XXXXXX");
	cr_assert_not_null(mkdtemp(tmpdir));
	snprintf(yaml_path, sizeof(yaml_path), "%s/mtlzd.yaml", tmpdir);
	snprintf(dump_path, sizeof(dump_path), "%s/dump.yaml", tmpdir);
	mtlz_conf_init(&conf);
	err[0] = '\0';
}

static void teardown(void)
{
	mtlz_conf_free(&conf);
	unlink(yaml_path);
	unlink(dump_path);
	rmdir(tmpdir);
}

TestSuite(conf, .init = setup, .fini = teardown);

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	cr_assert_not_null(f);
	fputs(text, f);
	cr_assert_eq(fclose(f), 0);
}

/* Loads `text` as a YAML file into conf; returns the status. */
static int load_text(const char *text)
{
	write_file(yaml_path, text);
	return mtlz_conf_load(&conf, yaml_path, err, sizeof(err));
}

/* Asserts the last error contains every fragment. */
static void expect_err(const char *a, const char *b)
{
	cr_assert(strstr(err, a), "'%s' not in error: %s", a, err);
	if (b)
		cr_assert(strstr(err, b), "'%s' not in error: %s", b, err);
}

/* "<tmp file>:<line>:<col>: " - the position prefix of a load error. */
static void expect_at(int line, int col)
{
	char want[256];

	snprintf(want, sizeof(want), "%s:%d:%d: ", yaml_path, line, col);
	cr_assert(strncmp(err, want, strlen(want)) == 0, "expected '%s...', got: %s",
		  want, err);
}

static const char *kv_get(const mtlz_kv *kv, int n, const char *key)
{
	for (int i = 0; i < n; i++)
		if (strcmp(kv[i].key, key) == 0)
			return kv[i].value;
	return NULL;
}

static void assert_kv_eq(const mtlz_kv *a, int na, const mtlz_kv *b, int nb)
{
	cr_assert_eq(na, nb);
	for (int i = 0; i < na; i++) {
		cr_assert_str_eq(a[i].key, b[i].key);
		cr_assert_str_eq(a[i].value, b[i].value);
	}
}

static void assert_conf_eq(const mtlz_conf *a, const mtlz_conf *b)
{
	cr_assert_str_eq(a->kafka_brokers, b->kafka_brokers);
	cr_assert_str_eq(a->kafka_group_id, b->kafka_group_id);
	assert_kv_eq(a->kafka_consumer, a->n_kafka_consumer, b->kafka_consumer,
		     b->n_kafka_consumer);
	assert_kv_eq(a->kafka_producer, a->n_kafka_producer, b->kafka_producer,
		     b->n_kafka_producer);
	cr_assert_str_eq(a->topics_input, b->topics_input);
	cr_assert_str_eq(a->topics_output, b->topics_output);
	cr_assert_str_eq(a->topics_dead_letter, b->topics_dead_letter);
	cr_assert_str_eq(a->input_framing, b->input_framing);
	cr_assert_str_eq(a->input_schema_dir, b->input_schema_dir);
	cr_assert_eq(a->input_max_message_bytes, b->input_max_message_bytes);
	cr_assert_str_eq(a->output_framing, b->output_framing);
	cr_assert_eq(a->output_schema_id, b->output_schema_id);
	cr_assert_str_eq(a->model_path, b->model_path);
	cr_assert_str_eq(a->model_version, b->model_version);
	cr_assert_str_eq(a->engine_kind, b->engine_kind);
	cr_assert_eq(a->engine_threads, b->engine_threads);
	cr_assert_eq(a->engine_mc_samples, b->engine_mc_samples);
	cr_assert_eq(a->engine_seed, b->engine_seed);
	cr_assert_str_eq(a->engine_precision, b->engine_precision);
	cr_assert_eq(a->batch_max_size, b->batch_max_size);
	cr_assert_eq(a->batch_max_delay_ms, b->batch_max_delay_ms);
	cr_assert_eq(a->preprocess_threads, b->preprocess_threads);
	cr_assert_str_eq(a->preprocess_mask_bits, b->preprocess_mask_bits);
	cr_assert_str_eq(a->delivery_guarantee, b->delivery_guarantee);
	cr_assert_str_eq(a->delivery_transactional_id, b->delivery_transactional_id);
	cr_assert_str_eq(a->log_level, b->log_level);
	cr_assert_eq(a->status_interval_ms, b->status_interval_ms);
}

/* The documented defaults, model.path aside (it has none). */
static void assert_defaults(const mtlz_conf *c)
{
	cr_assert_str_eq(c->kafka_brokers, "localhost:9092");
	cr_assert_str_eq(c->kafka_group_id, "mtlzd");
	cr_assert_str_eq(c->topics_input, "spectra");
	cr_assert_str_eq(c->topics_output, "results");
	cr_assert_str_eq(c->topics_dead_letter, "spectra.dlq");
	cr_assert_str_eq(c->input_framing, "auto");
	cr_assert_str_eq(c->input_schema_dir, "");
	cr_assert_eq(c->input_max_message_bytes, 4194304);
	cr_assert_str_eq(c->output_framing, "single_object");
	cr_assert_eq(c->output_schema_id, -1);
	cr_assert_str_eq(c->model_version, "");
	cr_assert_str_eq(c->engine_kind, "cpu");
	cr_assert_eq(c->engine_threads, 0);
	cr_assert_eq(c->engine_mc_samples, 100);
	cr_assert_eq(c->engine_seed, 42);
	cr_assert_str_eq(c->engine_precision, "fp32");
	cr_assert_eq(c->batch_max_size, 64);
	cr_assert_eq(c->batch_max_delay_ms, 50);
	cr_assert_eq(c->preprocess_threads, 0);
	cr_assert_str_eq(c->preprocess_mask_bits, "");
	cr_assert_str_eq(c->delivery_guarantee, "at_least_once");
	cr_assert_str_eq(c->delivery_transactional_id, "");
	cr_assert_str_eq(c->log_level, "info");
	cr_assert_eq(c->status_interval_ms, 10000);
}

/* ---- defaults and the reference file ---------------------------------- */

Test(conf, init_sets_documented_defaults)
{
	assert_defaults(&conf);
	cr_assert_str_eq(conf.model_path, "");
	cr_assert_eq(conf.n_kafka_consumer, 0);
	cr_assert_eq(conf.n_kafka_producer, 0);
}

Test(conf, reference_file_loads_with_documented_values)
{
	int rc = mtlz_conf_load(&conf, MTLZ_SOURCE_DIR "/etc/mtlzd.yaml", err,
				sizeof(err));

	cr_assert_eq(rc, MTLZ_OK, "%s", err);
	assert_defaults(&conf);
	cr_assert_str_eq(conf.model_path, "");   /* "": the default model */
	cr_assert_eq(conf.n_kafka_consumer, 1);
	cr_assert_str_eq(kv_get(conf.kafka_consumer, 1, "client.id"), "mtlzd");
	cr_assert_eq(conf.n_kafka_producer, 1);
	cr_assert_str_eq(kv_get(conf.kafka_producer, 1, "client.id"), "mtlzd");
	/* mtlzd resolves the empty model.path first (test_default_model.c) */
	cr_assert_eq(mtlz_conf_set(&conf, "model.path=/m.safetensors", err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_conf_validate(&conf, err, sizeof(err)), MTLZ_OK, "%s", err);
}

Test(conf, empty_file_keeps_defaults)
{
	cr_assert_eq(load_text(""), MTLZ_OK, "%s", err);
	assert_defaults(&conf);
	cr_assert_eq(load_text("# only a comment\n"), MTLZ_OK, "%s", err);
	cr_assert_eq(load_text("---\n"), MTLZ_OK, "%s", err);
	assert_defaults(&conf);
}

Test(conf, load_applies_over_current_values)
{
	cr_assert_eq(mtlz_conf_set(&conf, "batch.max_size=8", err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(load_text("log: {level: debug}\n"), MTLZ_OK, "%s", err);
	cr_assert_eq(conf.batch_max_size, 8);
	cr_assert_str_eq(conf.log_level, "debug");
}

/* ---- nested and pass-through keys ------------------------------------- */

Test(conf, nested_keys_set_fields)
{
	cr_assert_eq(load_text("kafka:\n"
			       "  brokers: b1:9092,b2:9092\n"
			       "  group_id: g\n"
			       "batch:\n"
			       "  max_size: 256\n"
			       "  max_delay_ms: 0\n"
			       "engine:\n"
			       "  seed: 9007199254740993\n"
			       "model:\n"
			       "  path: \"/m/x.safetensors\"\n"
			       "  version: 'v1: test'\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_str_eq(conf.kafka_brokers, "b1:9092,b2:9092");
	cr_assert_str_eq(conf.kafka_group_id, "g");
	cr_assert_eq(conf.batch_max_size, 256);
	cr_assert_eq(conf.batch_max_delay_ms, 0);
	cr_assert_eq(conf.engine_seed, 9007199254740993LL);
	cr_assert_str_eq(conf.model_path, "/m/x.safetensors");
	cr_assert_str_eq(conf.model_version, "v1: test");
}

Test(conf, dotted_keys_equal_nested_keys)
{
	cr_assert_eq(load_text("batch.max_size: 7\n"
			       "engine: {kind: cuda, mc_samples: 0}\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(conf.batch_max_size, 7);
	cr_assert_str_eq(conf.engine_kind, "cuda");
	cr_assert_eq(conf.engine_mc_samples, 0);
}

Test(conf, passthrough_keys_with_dots_land_in_kv_arrays)
{
	cr_assert_eq(load_text("kafka:\n"
			       "  consumer:\n"
			       "    fetch.wait.max.ms: 10\n"
			       "    enable.partition.eof: false\n"
			       "    security.protocol: SASL_SSL\n"
			       "    debug:\n"
			       "  producer:\n"
			       "    linger.ms: 5\n"
			       "    sasl.password: \"p:w #1\"\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(conf.n_kafka_consumer, 4);
	cr_assert_str_eq(conf.kafka_consumer[3].key, "debug");
	cr_assert_str_eq(conf.kafka_consumer[3].value, "");
	cr_assert_str_eq(conf.kafka_consumer[0].key, "fetch.wait.max.ms");
	cr_assert_str_eq(conf.kafka_consumer[0].value, "10");
	cr_assert_str_eq(conf.kafka_consumer[1].key, "enable.partition.eof");
	cr_assert_str_eq(conf.kafka_consumer[1].value, "false");
	cr_assert_str_eq(conf.kafka_consumer[2].value, "SASL_SSL");
	cr_assert_eq(conf.n_kafka_producer, 2);
	cr_assert_str_eq(kv_get(conf.kafka_producer, 2, "linger.ms"), "5");
	cr_assert_str_eq(kv_get(conf.kafka_producer, 2, "sasl.password"), "p:w #1");
}

Test(conf, passthrough_written_flat_or_nested_joins_with_dots)
{
	cr_assert_eq(load_text("kafka.consumer.fetch.wait.max.ms: 10\n"
			       "kafka:\n"
			       "  consumer:\n"
			       "    ssl:\n"
			       "      ca.location: /ca.pem\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(conf.n_kafka_consumer, 2);
	cr_assert_str_eq(kv_get(conf.kafka_consumer, 2, "fetch.wait.max.ms"), "10");
	cr_assert_str_eq(kv_get(conf.kafka_consumer, 2, "ssl.ca.location"), "/ca.pem");
}

Test(conf, commented_out_section_is_empty)
{
	cr_assert_eq(load_text("kafka:\n"
			       "  consumer:\n"
			       "    # security.protocol: SSL\n"
			       "  producer:\n"
			       "batch:\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(conf.n_kafka_consumer, 0);
	cr_assert_eq(conf.n_kafka_producer, 0);
	assert_defaults(&conf);
}

Test(conf, passthrough_over_limit_is_error)
{
	char *text = malloc(64 * (MTLZ_CONF_MAX_PASSTHROUGH + 2));
	size_t used = 0;

	cr_assert_not_null(text);
	used += sprintf(text, "kafka:\n  producer:\n");
	for (int i = 0; i <= MTLZ_CONF_MAX_PASSTHROUGH; i++)
		used += sprintf(text + used, "    p%d.x: %d\n", i, i);
	cr_assert_eq(load_text(text), MTLZ_ERR_INVALID);
	free(text);
	/* line 3 holds p0: the 65th property is on line 3 + 64 */
	expect_at(3 + MTLZ_CONF_MAX_PASSTHROUGH, 5);
	expect_err("kafka.producer", "more than 64");
	cr_assert_eq(conf.n_kafka_producer, 0);
}

/* ---- load errors: message names the key and line:column --------------- */

Test(conf, unknown_key_names_key_and_position)
{
	cr_assert_eq(load_text("batch:\n"
			       "  max_size: 8\n"
			       "  max_sise: 9\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 3);
	expect_err("unknown key 'batch.max_sise'", "did you mean 'batch.max_size'");
}

Test(conf, unknown_section_names_section)
{
	cr_assert_eq(load_text("log:\n  level: warn\nbach:\n  max_size: 8\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 1);
	expect_err("unknown key 'bach'", NULL);
}

Test(conf, sequence_where_scalar_expected_is_error)
{
	cr_assert_eq(load_text("kafka:\n"
			       "  brokers:\n"
			       "    - a:9092\n"
			       "    - b:9092\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 5);
	expect_err("kafka.brokers", "expected a scalar, got a sequence");
}

Test(conf, flow_sequence_for_passthrough_is_error)
{
	cr_assert_eq(load_text("kafka:\n  consumer:\n    debug: [cgrp, fetch]\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 12);
	expect_err("kafka.consumer.debug", "got a sequence");
}

Test(conf, mapping_where_scalar_expected_is_error)
{
	cr_assert_eq(load_text("log:\n  level:\n    x: 1\n"), MTLZ_ERR_INVALID);
	expect_at(3, 5);
	expect_err("log.level", "got a mapping");
}

Test(conf, scalar_where_section_expected_is_error)
{
	cr_assert_eq(load_text("batch: 64\n"), MTLZ_ERR_INVALID);
	expect_at(1, 8);
	expect_err("batch", "expected a mapping");
	cr_assert_eq(load_text("kafka:\n  consumer: x\n"), MTLZ_ERR_INVALID);
	expect_at(2, 13);
	expect_err("kafka.consumer", "expected a mapping");
}

Test(conf, non_integer_is_error)
{
	cr_assert_eq(load_text("engine:\n  kind: cpu\n  threads: four\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 12);
	expect_err("engine.threads = 'four' is not an integer", NULL);
	cr_assert_eq(load_text("batch: {max_size: 1.5}\n"), MTLZ_ERR_INVALID);
	expect_at(1, 19);
	expect_err("batch.max_size = '1.5' is not an integer", NULL);
	cr_assert_eq(load_text("batch:\n  max_delay_ms:\n"), MTLZ_ERR_INVALID);
	expect_err("batch.max_delay_ms", "not an integer");
}

Test(conf, out_of_range_int_is_error)
{
	cr_assert_eq(load_text("\n# comment\nbatch:\n    max_size: 0\n"),
		     MTLZ_ERR_INVALID);
	expect_at(4, 15);
	expect_err("batch.max_size = 0 out of range 1..4096", NULL);
	cr_assert_eq(load_text("input:\n  max_message_bytes: 1023\n"), MTLZ_ERR_INVALID);
	expect_err("input.max_message_bytes = 1023 out of range 1024..268435456", NULL);
	cr_assert_eq(load_text("output: {schema_id: -2}\n"), MTLZ_ERR_INVALID);
	expect_err("output.schema_id = -2 out of range -1..2147483647", NULL);
}

Test(conf, int_overflow_is_out_of_range)
{
	cr_assert_eq(load_text("status:\n  interval_ms: 99999999999999999999999\n"),
		     MTLZ_ERR_INVALID);
	expect_at(2, 16);
	expect_err("status.interval_ms", "out of range 100..3600000");
	cr_assert_eq(load_text("engine:\n  seed: 99999999999999999999999\n"),
		     MTLZ_ERR_INVALID);
	expect_err("engine.seed", "out of range");
}

Test(conf, enum_value_outside_list_is_error_listing_values)
{
	cr_assert_eq(load_text("input:\n  framing: avro\n"), MTLZ_ERR_INVALID);
	expect_at(2, 12);
	expect_err("input.framing = 'avro'",
		   "auto, confluent, single_object, container");
	cr_assert_eq(load_text("engine:\n  kind: gpu\n"), MTLZ_ERR_INVALID);
	expect_err("engine.kind = 'gpu'", "cpu, cuda, auto");
	cr_assert_eq(load_text("engine:\n  precision: fp16\n"), MTLZ_ERR_INVALID);
	expect_err("engine.precision = 'fp16'", "fp32, tf32");
	cr_assert_eq(load_text("output:\n  framing: auto\n"), MTLZ_ERR_INVALID);
	expect_err("output.framing = 'auto'", "single_object, confluent, container");
}

Test(conf, enum_matches_case_insensitively_and_stores_table_spelling)
{
	cr_assert_eq(load_text("log: {level: WARN}\ndelivery: {guarantee: Exactly_Once}\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_str_eq(conf.log_level, "warn");
	cr_assert_str_eq(conf.delivery_guarantee, "exactly_once");
}

Test(conf, bad_mask_bits_is_error)
{
	cr_assert_eq(load_text("preprocess:\n  mask_bits: NODATA,NOSUCHBIT\n"),
		     MTLZ_ERR_INVALID);
	expect_at(2, 14);
	expect_err("preprocess.mask_bits", "NOSUCHBIT");
	cr_assert_eq(load_text("preprocess:\n  mask_bits: NODATA,FULLREJECT\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_str_eq(conf.preprocess_mask_bits, "NODATA,FULLREJECT");
}

Test(conf, duplicate_key_is_error)
{
	cr_assert_eq(load_text("batch:\n"
			       "  max_size: 8\n"
			       "  max_size: 9\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 3);
	expect_err("duplicate key 'batch.max_size'", "line 2, column 3");
	/* the same key spelt nested and dotted */
	cr_assert_eq(load_text("batch:\n  max_size: 8\nbatch.max_size: 9\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 1);
	expect_err("duplicate key 'batch.max_size'", NULL);
	cr_assert_eq(conf.batch_max_size, 64);
}

Test(conf, duplicate_section_key_is_error)
{
	cr_assert_eq(load_text("log:\n  level: warn\nbatch: {max_size: 2}\n"
			       "log:\n  level: debug\n"),
		     MTLZ_ERR_INVALID);
	expect_at(4, 1);
	expect_err("duplicate key 'log'", "line 1, column 1");
	cr_assert_eq(load_text("kafka:\n  consumer: {a: 1}\n  consumer: {b: 2}\n"),
		     MTLZ_ERR_INVALID);
	expect_at(3, 3);
	expect_err("duplicate key 'kafka.consumer'", NULL);
}

Test(conf, duplicate_passthrough_key_is_error)
{
	cr_assert_eq(load_text("kafka:\n"
			       "  consumer:\n"
			       "    fetch.wait.max.ms: 10\n"
			       "    fetch:\n"
			       "      wait.max.ms: 20\n"),
		     MTLZ_ERR_INVALID);
	expect_at(5, 7);
	expect_err("duplicate key 'kafka.consumer.fetch.wait.max.ms'", "line 3, column 5");
}

Test(conf, yaml_syntax_error_names_position)
{
	cr_assert_eq(load_text("batch:\n  max_size: 8\n  max_delay_ms: [1, 2\n"),
		     MTLZ_ERR_FORMAT);
	/* libyaml notices at the end of input, and names where the list began */
	expect_at(4, 1);
	expect_err("YAML syntax error: did not find expected ',' or ']'",
		   "flow sequence at line 3, column 17");
	cr_assert_eq(load_text("log:\n  level: info\n bad: indent\n"), MTLZ_ERR_FORMAT);
	expect_at(3, 2);
	expect_err("YAML syntax error", NULL);
}

Test(conf, tab_indentation_is_syntax_error)
{
	cr_assert_eq(load_text("log:\n\tlevel: info\n"), MTLZ_ERR_FORMAT);
	expect_at(2, 1);
	expect_err("YAML syntax error", "cannot start any token");
}

Test(conf, missing_file_says_why)
{
	cr_assert_eq(mtlz_conf_load(&conf, "/nonexistent/mtlzd.yaml", err, sizeof(err)),
		     MTLZ_ERR_IO);
	expect_err("/nonexistent/mtlzd.yaml", "No such file or directory");
	cr_assert_eq(mtlz_conf_load(&conf, tmpdir, err, sizeof(err)), MTLZ_ERR_IO);
	expect_err(tmpdir, "Is a directory");
}

Test(conf, top_level_must_be_mapping)
{
	cr_assert_eq(load_text("- batch.max_size: 8\n"), MTLZ_ERR_FORMAT);
	expect_at(1, 1);
	expect_err("expected a mapping", "sequence");
}

Test(conf, second_document_is_error)
{
	cr_assert_eq(load_text("log: {level: warn}\n---\nlog: {level: debug}\n"),
		     MTLZ_ERR_FORMAT);
	expect_at(3, 1);
	expect_err("more than one YAML document", NULL);
	cr_assert_str_eq(conf.log_level, "info");
}

Test(conf, aliases_are_refused)
{
	cr_assert_eq(load_text("topics:\n  input: &t spectra\n  output: *t\n"),
		     MTLZ_ERR_FORMAT);
	expect_err("aliases are not supported", NULL);
	cr_assert_eq(load_text("topics:\n  input: x\n  output: *nope\n"),
		     MTLZ_ERR_FORMAT);
	expect_err("YAML syntax error", "undefined alias");
}

Test(conf, non_scalar_key_is_error)
{
	cr_assert_eq(load_text("log:\n  ? [a, b]\n  : 1\n"), MTLZ_ERR_FORMAT);
	expect_at(2, 5);
	expect_err("log: keys must be scalars", NULL);
}

Test(conf, failed_load_leaves_conf_unchanged)
{
	cr_assert_eq(load_text("kafka:\n"
			       "  brokers: elsewhere:9092\n"
			       "  consumer: {a.b: c}\n"
			       "batch:\n"
			       "  max_size: 9000\n"),
		     MTLZ_ERR_INVALID);
	expect_at(5, 13);
	assert_defaults(&conf);
	cr_assert_eq(conf.n_kafka_consumer, 0);
}

/* ---- --set ------------------------------------------------------------ */

Test(conf, set_overrides_each_type)
{
	cr_assert_eq(mtlz_conf_set(&conf, "batch.max_size=128", err, sizeof(err)), MTLZ_OK,
		     "%s", err);
	cr_assert_eq(mtlz_conf_set(&conf, "engine.kind=cuda", err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_conf_set(&conf, "model.path=/m/a=b.safetensors", err,
				   sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_conf_set(&conf, "model.version=", err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_conf_set(&conf, "engine.seed=-0", err, sizeof(err)), MTLZ_OK);
	cr_assert_eq(mtlz_conf_set(&conf, "kafka.producer.compression.type=lz4", err,
				   sizeof(err)), MTLZ_OK);
	cr_assert_eq(conf.batch_max_size, 128);
	cr_assert_str_eq(conf.engine_kind, "cuda");
	cr_assert_str_eq(conf.model_path, "/m/a=b.safetensors");
	cr_assert_str_eq(conf.model_version, "");
	cr_assert_eq(conf.engine_seed, 0);
	cr_assert_eq(conf.n_kafka_producer, 1);
	cr_assert_str_eq(conf.kafka_producer[0].key, "compression.type");
	cr_assert_str_eq(conf.kafka_producer[0].value, "lz4");
}

Test(conf, set_replaces_a_loaded_passthrough)
{
	cr_assert_eq(load_text("kafka:\n  consumer:\n    fetch.wait.max.ms: 10\n"),
		     MTLZ_OK, "%s", err);
	cr_assert_eq(mtlz_conf_set(&conf, "kafka.consumer.fetch.wait.max.ms=20", err,
				   sizeof(err)), MTLZ_OK);
	cr_assert_eq(conf.n_kafka_consumer, 1);
	cr_assert_str_eq(conf.kafka_consumer[0].value, "20");
}

Test(conf, set_rejects_bad_input)
{
	cr_assert_eq(mtlz_conf_set(&conf, "batch.max_sise=8", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("--set", "unknown key 'batch.max_sise'");
	cr_assert_eq(mtlz_conf_set(&conf, "batch.max_size=0", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("--set", "batch.max_size = 0 out of range 1..4096");
	cr_assert_eq(mtlz_conf_set(&conf, "batch.max_size=8k", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("--set", "batch.max_size = '8k' is not an integer");
	cr_assert_eq(mtlz_conf_set(&conf, "batch.max_size= 8", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	cr_assert_eq(mtlz_conf_set(&conf, "log.level=verbose", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("log.level = 'verbose'", "debug, info, warn, error");
	cr_assert_eq(mtlz_conf_set(&conf, "batch.max_size", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("--set 'batch.max_size'", "key=value");
	cr_assert_eq(mtlz_conf_set(&conf, "=8", err, sizeof(err)), MTLZ_ERR_INVALID);
	expect_err("--set", "empty key");
	cr_assert_eq(mtlz_conf_set(&conf, "kafka.consumer=x", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("kafka.consumer", "<property>");
	cr_assert_eq(mtlz_conf_set(&conf, "kafka.consumer.=x", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("--set", "empty librdkafka property name");
	cr_assert_eq(mtlz_conf_set(&conf, "batch=8", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	assert_defaults(&conf);
	cr_assert_eq(conf.n_kafka_consumer, 0);
}

Test(conf, set_passthrough_over_limit_is_error)
{
	char kv[64];

	for (int i = 0; i < MTLZ_CONF_MAX_PASSTHROUGH; i++) {
		snprintf(kv, sizeof(kv), "kafka.consumer.p%d=%d", i, i);
		cr_assert_eq(mtlz_conf_set(&conf, kv, err, sizeof(err)), MTLZ_OK);
	}
	cr_assert_eq(mtlz_conf_set(&conf, "kafka.consumer.p0=again", err, sizeof(err)),
		     MTLZ_OK, "replacing needs no new slot");
	cr_assert_eq(mtlz_conf_set(&conf, "kafka.consumer.one.more=1", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("kafka.consumer.one.more", "more than 64");
	cr_assert_eq(conf.n_kafka_consumer, MTLZ_CONF_MAX_PASSTHROUGH);
}

/* ---- validate --------------------------------------------------------- */

static int validate_with(const char *set)
{
	cr_assert_eq(mtlz_conf_set(&conf, "model.path=/m.safetensors", err, sizeof(err)),
		     MTLZ_OK);
	if (set)
		cr_assert_eq(mtlz_conf_set(&conf, set, err, sizeof(err)), MTLZ_OK, "%s", err);
	return mtlz_conf_validate(&conf, err, sizeof(err));
}

Test(conf, validate_requires_model_path)
{
	cr_assert_eq(mtlz_conf_validate(&conf, err, sizeof(err)), MTLZ_ERR_INVALID);
	expect_err("model.path", NULL);
	cr_assert_eq(validate_with(NULL), MTLZ_OK, "%s", err);
}

Test(conf, validate_requires_distinct_nonempty_topics)
{
	cr_assert_eq(validate_with("topics.output=spectra"), MTLZ_ERR_INVALID);
	expect_err("topics.input", "topics.output");
	mtlz_conf_set(&conf, "topics.output=results", err, sizeof(err));
	cr_assert_eq(validate_with("topics.dead_letter=spectra"), MTLZ_ERR_INVALID);
	expect_err("topics.dead_letter", "topics.input");
	cr_assert_eq(validate_with("topics.dead_letter=results"), MTLZ_ERR_INVALID);
	expect_err("topics.dead_letter", "topics.output");
	mtlz_conf_set(&conf, "topics.dead_letter=dlq", err, sizeof(err));
	cr_assert_eq(validate_with("topics.input="), MTLZ_ERR_INVALID);
	expect_err("topics.input is empty", NULL);
}

Test(conf, validate_requires_brokers_and_group)
{
	cr_assert_eq(validate_with("kafka.brokers="), MTLZ_ERR_INVALID);
	expect_err("kafka.brokers", NULL);
	mtlz_conf_set(&conf, "kafka.brokers=k:9092", err, sizeof(err));
	cr_assert_eq(validate_with("kafka.group_id="), MTLZ_ERR_INVALID);
	expect_err("kafka.group_id", NULL);
}

Test(conf, validate_confluent_output_needs_schema_id)
{
	cr_assert_eq(validate_with("output.framing=confluent"), MTLZ_ERR_INVALID);
	expect_err("output.schema_id", NULL);
	cr_assert_eq(validate_with("output.schema_id=0"), MTLZ_OK, "%s", err);
}

Test(conf, validate_confluent_input_needs_schema_dir)
{
	cr_assert_eq(validate_with("input.framing=confluent"), MTLZ_ERR_INVALID);
	expect_err("input.schema_dir", NULL);
	cr_assert_eq(validate_with("input.schema_dir=/etc/mtlz/schemas"), MTLZ_OK, "%s", err);
}

Test(conf, validate_accepts_exactly_once_without_transactional_id)
{
	cr_assert_eq(validate_with("delivery.guarantee=exactly_once"), MTLZ_OK, "%s", err);
	cr_assert_str_eq(conf.delivery_transactional_id, "");
}

Test(conf, validate_tf32_needs_a_cuda_capable_engine_kind)
{
	cr_assert_eq(validate_with("engine.precision=tf32"), MTLZ_ERR_INVALID);
	expect_err("engine.precision = tf32", "engine.kind cuda or auto");
	cr_assert_eq(validate_with("engine.kind=auto"), MTLZ_OK, "%s", err);
	cr_assert_eq(validate_with("engine.kind=cuda"), MTLZ_OK, "%s", err);
	cr_assert_eq(validate_with("engine.precision=fp32"), MTLZ_OK, "%s", err);
	cr_assert_eq(validate_with("engine.kind=cpu"), MTLZ_OK, "%s", err);
}

Test(conf, preprocess_threads_zero_means_automatic)
{
	cr_assert_eq(validate_with("preprocess.threads=0"), MTLZ_OK, "%s", err);
	cr_assert_eq(conf.preprocess_threads, 0);
	cr_assert_eq(mtlz_conf_set(&conf, "preprocess.threads=-1", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
	expect_err("preprocess.threads", "out of range");
	cr_assert_eq(mtlz_conf_set(&conf, "preprocess.threads=65", err, sizeof(err)),
		     MTLZ_ERR_INVALID);
}

Test(conf, validate_rejects_passthrough_of_owned_properties)
{
	cr_assert_eq(validate_with("kafka.consumer.group.id=other"), MTLZ_ERR_INVALID);
	expect_err("kafka.consumer.group.id", "kafka.group_id");
	mtlz_conf_free(&conf);
	mtlz_conf_init(&conf);
	cr_assert_eq(validate_with("kafka.producer.bootstrap.servers=x:1"), MTLZ_ERR_INVALID);
	expect_err("kafka.producer.bootstrap.servers", "kafka.brokers");
	mtlz_conf_free(&conf);
	mtlz_conf_init(&conf);
	cr_assert_eq(validate_with("kafka.producer.transactional.id=t"), MTLZ_ERR_INVALID);
	expect_err("kafka.producer.transactional.id", "delivery.transactional_id");
}

/* ---- dump ------------------------------------------------------------- */

static void dump_and_reload(const mtlz_conf *c, mtlz_conf *back)
{
	FILE *f = fopen(dump_path, "w");

	cr_assert_not_null(f);
	mtlz_conf_dump(c, f);
	cr_assert_eq(fclose(f), 0);
	mtlz_conf_init(back);
	cr_assert_eq(mtlz_conf_load(back, dump_path, err, sizeof(err)), MTLZ_OK,
		     "dump does not load back: %s", err);
}

Test(conf, dump_of_defaults_loads_back_equal)
{
	mtlz_conf back;

	dump_and_reload(&conf, &back);
	assert_conf_eq(&conf, &back);
	mtlz_conf_free(&back);
}

Test(conf, dump_round_trip_keeps_every_value)
{
	static const char *const sets[] = {
		"kafka.brokers=b1:9092,b2:9093",
		"kafka.group_id=g \"quoted\" \\ back",
		"kafka.consumer.fetch.wait.max.ms=10",
		"kafka.consumer.enable.partition.eof=true",
		"kafka.producer.sasl.password=p:w #1 'x'",
		"kafka.producer.client.id=line1\nline2\ttab",
		"topics.input=in",
		"topics.output=out: x",
		"topics.dead_letter=- dlq",
		"input.framing=container",
		"input.schema_dir=/s",
		"input.max_message_bytes=268435456",
		"output.framing=confluent",
		"output.schema_id=2147483647",
		"model.path=/m/\xc3\xa9t\xc3\xa9.safetensors",
		"model.version=null",
		"engine.kind=cuda",
		"engine.threads=1024",
		"engine.mc_samples=0",
		"engine.seed=9223372036854775807",
		"engine.precision=tf32",
		"batch.max_size=4096",
		"batch.max_delay_ms=0",
		"preprocess.threads=64",
		"preprocess.mask_bits=0x1800000",
		"delivery.guarantee=exactly_once",
		"delivery.transactional_id=~",
		"log.level=error",
		"status.interval_ms=100",
	};
	mtlz_conf back;

	for (size_t i = 0; i < MTLZ_ARRAY_SIZE(sets); i++)
		cr_assert_eq(mtlz_conf_set(&conf, sets[i], err, sizeof(err)), MTLZ_OK,
			     "%s: %s", sets[i], err);
	dump_and_reload(&conf, &back);
	assert_conf_eq(&conf, &back);
	cr_assert_str_eq(back.model_version, "null");
	cr_assert_str_eq(back.delivery_transactional_id, "~");
	mtlz_conf_free(&back);
}

Test(conf, dump_of_reference_file_round_trips)
{
	mtlz_conf back;

	cr_assert_eq(mtlz_conf_load(&conf, MTLZ_SOURCE_DIR "/etc/mtlzd.yaml", err,
				    sizeof(err)), MTLZ_OK, "%s", err);
	dump_and_reload(&conf, &back);
	assert_conf_eq(&conf, &back);
	mtlz_conf_free(&back);
}

/* ---- free ------------------------------------------------------------- */

Test(conf, free_is_idempotent_and_leaves_nothing)
{
	cr_assert_eq(mtlz_conf_set(&conf, "kafka.consumer.a=b", err, sizeof(err)), MTLZ_OK);
	mtlz_conf_free(&conf);
	cr_assert_null(conf.kafka_brokers);
	cr_assert_eq(conf.n_kafka_consumer, 0);
	mtlz_conf_free(&conf); /* teardown frees a third time */
	mtlz_conf_free(NULL);
}
