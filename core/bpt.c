/*
 * bpt.c - BPT demarcations, strong-line metallicities, Table 1 (bpt.h).
 */
#include "bpt.h"

#include <ctype.h>
#include <math.h>
#include <string.h>
#include <strings.h>

double mtlz_bpt_kauffmann03(double x)
{
	return x < 0.05 ? 0.61 / (x - 0.05) + 1.30 : INFINITY;
}

double mtlz_bpt_kewley01(double x)
{
	return x < 0.47 ? 0.61 / (x - 0.47) + 1.19 : INFINITY;
}

int mtlz_bpt_class(double n2, double o3)
{
	if (!isfinite(n2) || !isfinite(o3))
		return MTLZ_CLASS_NONE;
	if (n2 < 0.05 && o3 < mtlz_bpt_kauffmann03(n2))
		return MTLZ_CLASS_STAR_FORMING;
	if (n2 < 0.47 && o3 < mtlz_bpt_kewley01(n2))
		return MTLZ_CLASS_COMPOSITE;
	return MTLZ_CLASS_AGN;
}

double mtlz_oh_o3n2_pp04(double log_oiii_hb, double log_nii_ha)
{
	const double o3n2 = log_oiii_hb - log_nii_ha;

	return isfinite(o3n2) && o3n2 < 1.9 ? 8.73 - 0.32 * o3n2 : NAN;
}

double mtlz_oh_n2_pp04(double n2)
{
	return isfinite(n2) && n2 > -2.5 && n2 < -0.3 ? 8.90 + 0.57 * n2 : NAN;
}

int mtlz_class_from_bptclass(int c)
{
	switch (c) {
	case -1: return MTLZ_CLASS_PASSIVE;
	case 1: case 2: return MTLZ_CLASS_STAR_FORMING;
	case 3: return MTLZ_CLASS_COMPOSITE;
	case 4: case 5: return MTLZ_CLASS_AGN;
	default: return MTLZ_CLASS_NONE;
	}
}

int mtlz_class_from_portsmouth(const char *bpt)
{
	static const struct { const char *name; int cls; } map[] = {
		{ "BLANK", MTLZ_CLASS_PASSIVE }, { "Star Forming", MTLZ_CLASS_STAR_FORMING },
		{ "Composite", MTLZ_CLASS_COMPOSITE }, { "LINER", MTLZ_CLASS_AGN },
		{ "Seyfert", MTLZ_CLASS_AGN }, { "LINER/Seyfert", MTLZ_CLASS_AGN },
	};
	size_t len;

	while (isspace((unsigned char)*bpt))
		bpt++;
	len = strlen(bpt);
	while (len && isspace((unsigned char)bpt[len - 1]))
		len--;
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
		if (strlen(map[i].name) == len && strncasecmp(bpt, map[i].name, len) == 0)
			return map[i].cls;
	return MTLZ_CLASS_NONE;
}
