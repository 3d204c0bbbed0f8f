/* zp_internal.h — helpers shared by the zp stage's files (zp.c, apcorr.c). */
#ifndef SP_ZP_INTERNAL_H
#define SP_ZP_INTERNAL_H
#include "surveyproc/sp_h5.h"
#include "surveyproc/sp_zp.h"

/* Split the store's "bands" attribute ("g,r,i") into names (*out: malloc'ed). */
int sp_zp_split_bands(const char *s, char (**out)[SP_ZP_BAND_MAX], int *nb);
/* 1 if the table has a column of that name. */
int sp_zp_has_col(const sp_h5_table_info *t, const char *name);
/* A column spec read/written as float64 (HDF5 converts the stored type). */
void sp_zp_f64_col(sp_h5_col *c, const char *name);

#endif
