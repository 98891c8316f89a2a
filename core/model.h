/*
 * model.h - the MTLforGalSpecZ multi-task 1D CNN (paper Section 3.1): its
 * architecture description and its weights, stored as safetensors.
 *
 *   input 1 x L (L = 5161: 3840-9000 A at 1 A)
 *   n_blocks x [Conv1d(k, pad) -> ReLU -> Conv1d(k, pad) -> ReLU -> MaxPool(pool, stride pool)]
 *   squeeze-and-excitation: GAP -> 1x1 conv C->C/r -> ReLU -> 1x1 conv C/r->C -> sigmoid -> x * s
 *   GAP -> two heads [dropout -> Linear -> ReLU -> ... -> Linear -> out]
 *       class head: n_classes logits (softmax), metal head: 1 (12 + log(O/H))
 *
 * Tensor names and shapes are those of the equivalent PyTorch module
 * (bench/torch_model.py), so `model.load_state_dict(safetensors.load_file())`
 * works unchanged. Weights are float32, PyTorch layout ([Cout, Cin, k] for
 * convolutions, [out, in] for linear layers). A model is immutable once
 * loaded: engines pack their own copy, so a new model can be swapped in
 * between batches while the old one is freed.
 */
#ifndef MTLZ_MODEL_H
#define MTLZ_MODEL_H

#include <stddef.h>
#include <stdint.h>

#define MTLZ_MAX_BLOCKS 8
#define MTLZ_MAX_HIDDEN 4
#define MTLZ_MAX_CLASSES 8
#define MTLZ_MODEL_FORMAT_VERSION "1"

typedef struct mtlz_arch {
	int input_length;             /* pixels on the model grid (5161) */
	int n_blocks;                 /* 5 */
	int channels[MTLZ_MAX_BLOCKS];/* 16, 32, 64, 128, 256 */
	int kernel;                   /* 3 */
	int padding;                  /* 1 ('same' for k = 3) */
	int pool;                     /* 3: max-pool window and stride */
	int attention_reduction;      /* r: squeeze to C/r channels; 0 = no attention */
	int n_hidden;                 /* 2 */
	int hidden[MTLZ_MAX_HIDDEN];  /* 128, 64 */
	int n_classes;                /* 4 */
	float dropout;                /* 0.5 (the paper does not state it) */
} mtlz_arch;

/* Model-grid definition (paper Section 2.2): wmin..wmax step dw, in A. */
typedef struct mtlz_grid {
	double wmin, wmax, dw;
} mtlz_grid;

typedef struct mtlz_model mtlz_model;

/* The paper's architecture and grid. */
void mtlz_arch_default(mtlz_arch *a);
void mtlz_grid_default(mtlz_grid *g);
int mtlz_grid_length(const mtlz_grid *g);

/* Checks an architecture for consistency (lengths stay >= 1 through every
 * block, sizes in range); explains the first problem found. */
int mtlz_arch_validate(const mtlz_arch *a, char *errstr, size_t errstr_size);
/* Length of the feature map after block b (b = n_blocks: the final one). */
int mtlz_arch_length_after(const mtlz_arch *a, int b);
/* Serialises to / parses from the JSON stored in "mtlz.arch". */
char *mtlz_arch_to_json(const mtlz_arch *a); /* malloc'ed */
int mtlz_arch_from_json(mtlz_arch *a, const char *json, char *errstr,
			size_t errstr_size);
/* Floating-point operations (multiply + add = 2) of one forward pass. */
double mtlz_arch_flops(const mtlz_arch *a);

/* A randomly initialised model, as PyTorch initialises Conv1d and Linear
 * (kaiming_uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
 * weights and biases), deterministic for `seed`. */
mtlz_model *mtlz_model_new_random(const mtlz_arch *a, const mtlz_grid *g,
				  uint64_t seed, char *errstr, size_t errstr_size);
/* Re-initialises every weight for training from scratch: He et al. (2015)
 * normal, variance 2 / fan_in, for layers followed by a ReLU, 1 / fan_in for
 * the heads' output layers and the attention's excitation; biases 0.
 * (PyTorch's default initialisation leaves this stack of ten ReLU
 * convolutions with a vanishing signal: its outputs are the same for every
 * input to 5 decimals, docs/retrain.md.) */
void mtlz_model_init_he(mtlz_model *m, uint64_t seed);
/* Loads and fully validates a safetensors model file. */
mtlz_model *mtlz_model_load(const char *path, char *errstr, size_t errstr_size);
int mtlz_model_save(const mtlz_model *m, const char *path, char *errstr,
		    size_t errstr_size);
/* Checkpoints: a model file plus up to 8 extra F32 tensors named optim.*
 * (optimiser state). load_ext accepts them and hands the file's tensors
 * to the caller in *extra (mtlz_st_free it); plain mtlz_model_load refuses
 * any tensor that is not the model's. */
struct mtlz_st_out;
struct mtlz_st;
int mtlz_model_save_ext(const mtlz_model *m, const char *path, const struct mtlz_st_out *extra,
			size_t n_extra, char *errstr, size_t errstr_size);
mtlz_model *mtlz_model_load_ext(const char *path, struct mtlz_st **extra, char *errstr,
				size_t errstr_size);
void mtlz_model_free(mtlz_model *m);

const mtlz_arch *mtlz_model_arch(const mtlz_model *m);
const mtlz_grid *mtlz_model_grid(const mtlz_model *m);
/* metallicity = head output * scale + offset */
void mtlz_model_target(const mtlz_model *m, double *offset, double *scale);
void mtlz_model_set_target(mtlz_model *m, double offset, double scale);
const char *mtlz_model_class_name(const mtlz_model *m, int c);
/* Temperature T of the class softmax, softmax(z / T), from the metadata key
 * "mtlz.calibration" ({"method": "temperature", "temperature": T, ...},
 * fitted on the validation split by mtlz-retrain); 1 when absent. Every
 * engine applies it, so calibrated probabilities are what callers see. */
double mtlz_model_temperature(const mtlz_model *m);
size_t mtlz_model_n_params(const mtlz_model *m);

/* Tensors in canonical order (the order they are written in). */
typedef struct mtlz_tensor {
	char name[64];
	int ndim;
	int64_t shape[3];
	size_t n;       /* elements */
	float *data;    /* inside the model's arena */
} mtlz_tensor;

size_t mtlz_model_n_tensors(const mtlz_model *m);
const mtlz_tensor *mtlz_model_tensor(const mtlz_model *m, size_t i);
const mtlz_tensor *mtlz_model_find(const mtlz_model *m, const char *name);
/* Mutable access, for training and tests. */
float *mtlz_model_data(mtlz_model *m, const char *name);
/* The names of the paper architecture's tensors, into buf (returned):
 * convolution conv (0, 1) of block b, "backbone.blocks.<b>.conv<conv+1>";
 * layer i of head h (0 class, 1 metallicity), "heads.<class|metal>.fc<i+1>";
 * then ".bias" when bias, else ".weight". */
const char *mtlz_name_conv(char *buf, size_t n, int b, int conv, int bias);
const char *mtlz_name_head(char *buf, size_t n, int h, int i, int bias);

/* Free-form metadata (provenance); the mtlz.* keys are managed by the model.
 * value NULL removes the key. */
int mtlz_model_set_meta(mtlz_model *m, const char *key, const char *value);
const char *mtlz_model_meta(const mtlz_model *m, const char *key);
size_t mtlz_model_meta_count(const mtlz_model *m);
void mtlz_model_meta_at(const mtlz_model *m, size_t i, const char **key,
			const char **value);

#endif
