/*
 * _resnet_jpeg: decode only the region of a JPEG that a training crop needs.
 *
 * A random crop covers 15-60% of a typical ImageNet photo. libjpeg-turbo can skip the rest:
 * jpeg_crop_scanline() restricts inverse DCT, upsampling and colour conversion to a band of
 * iMCU columns, jpeg_skip_scanlines() skips that work for the rows above the crop, and stopping
 * after the crop's last row skips the entropy decoding of everything below it. Combined with
 * DCT-domain scaling (1/2, 1/4, 1/8) this decodes exactly the pixels of a full decode inside
 * the region (up to the region's own edge columns and rows, which the caller's margin absorbs).
 *
 * The library is not linked at build time: load() dlopen()s the libjpeg-turbo that Pillow uses
 * (its wheel bundles one) or any other libjpeg-turbo >= 1.5 with the libjpeg 6.2 ABI, so the
 * build needs only a C compiler and the vendored headers next to this file. jpeg_CreateDecompress
 * checks that the library's ABI version and struct size match these headers.
 *
 * Python API (resnet_core/jpeg.py wraps it):
 *   load(path) -> None                          raises OSError
 *   header(data) -> (width, height, colour) | None
 *       colour: 1 for grayscale, 3 for YCbCr/RGB; None when this module cannot decode it
 *       (not a JPEG, CMYK/YCCK, 12-bit): the caller uses Pillow.
 *   decode_crop(data, denom, (x0, y0, x1, y1), (left, upper, right, lower), (w, h), flip)
 *       -> bytearray | None
 *       Decodes the image scaled by 1/denom (denom in 1, 2, 4, 8) only where it covers
 *       [x0, x1) x [y0, y1) (columns widened to iMCU boundaries by libjpeg), then resamples the
 *       box (coordinates of the scaled image) to w x h with Pillow's BILINEAR filter, mirrored
 *       when flip: h * w * 3 bytes of packed RGB. None when libjpeg warned (corrupt or
 *       truncated data): the caller falls back to Pillow, so such files behave exactly as they
 *       do there. Raises ValueError on a fatal decoding error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include "jpeglib.h"

typedef struct jpeg_error_mgr *(*std_error_fn)(struct jpeg_error_mgr *);
typedef void (*create_fn)(j_decompress_ptr, int, size_t);
typedef void (*cinfo_fn)(j_decompress_ptr);
typedef void (*mem_src_fn)(j_decompress_ptr, const unsigned char *, unsigned long);
typedef int (*read_header_fn)(j_decompress_ptr, boolean);
typedef boolean (*start_fn)(j_decompress_ptr);
typedef void (*crop_fn)(j_decompress_ptr, JDIMENSION *, JDIMENSION *);
typedef JDIMENSION (*skip_fn)(j_decompress_ptr, JDIMENSION);
typedef JDIMENSION (*read_fn)(j_decompress_ptr, JSAMPARRAY, JDIMENSION);

typedef struct {
    void *handle;
    std_error_fn std_error;
    create_fn create;
    cinfo_fn destroy;
    cinfo_fn abort;
    mem_src_fn mem_src;
    read_header_fn read_header;
    start_fn start;
    crop_fn crop;
    skip_fn skip;
    read_fn read;
} libjpeg_api;

static libjpeg_api lib;

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    error_mgr *err = (error_mgr *)cinfo->err;
    err->pub.format_message(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    /* Warnings are counted (num_warnings) and never printed; trace messages are dropped. */
    if (level < 0) cinfo->err->num_warnings++;
}

static void silent_output(j_common_ptr cinfo) { (void)cinfo; }

static PyObject *load(PyObject *self, PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        PyErr_Format(PyExc_OSError, "cannot load libjpeg from %s: %s", path, dlerror());
        return NULL;
    }
    libjpeg_api next = {.handle = handle}; /* committed only once every symbol resolves */
    struct {
        const char *name;
        void **slot;
    } symbols[] = {
        {"jpeg_std_error", (void **)&next.std_error},
        {"jpeg_CreateDecompress", (void **)&next.create},
        {"jpeg_destroy_decompress", (void **)&next.destroy},
        {"jpeg_abort_decompress", (void **)&next.abort},
        {"jpeg_mem_src", (void **)&next.mem_src},
        {"jpeg_read_header", (void **)&next.read_header},
        {"jpeg_start_decompress", (void **)&next.start},
        {"jpeg_crop_scanline", (void **)&next.crop},
        {"jpeg_skip_scanlines", (void **)&next.skip},
        {"jpeg_read_scanlines", (void **)&next.read},
    };
    for (size_t i = 0; i < sizeof(symbols) / sizeof(symbols[0]); i++) {
        void *fn = dlsym(handle, symbols[i].name);
        if (fn == NULL) {
            PyErr_Format(PyExc_OSError,
                         "%s has no %s: region decoding needs libjpeg-turbo >= 1.5 with the "
                         "libjpeg 6.2 API",
                         path, symbols[i].name);
            dlclose(handle);
            return NULL;
        }
        *symbols[i].slot = fn;
    }
    /* The library checks its ABI version and struct size against these headers. */
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    if (setjmp(err.jump)) {
        dlclose(handle);
        PyErr_Format(PyExc_OSError, "%s does not match the libjpeg 6.2 ABI: %s", path,
                     err.message);
        return NULL;
    }
    cinfo.err = next.std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.output_message = silent_output;
    next.create(&cinfo, JPEG_LIB_VERSION, sizeof(struct jpeg_decompress_struct));
    next.destroy(&cinfo);
    lib = next;
    Py_RETURN_NONE;
}

/* One decompressor over a memory buffer; the caller owns setjmp. */
static void open_decoder(struct jpeg_decompress_struct *cinfo, error_mgr *err,
                         const Py_buffer *data) {
    cinfo->err = lib.std_error(&err->pub);
    err->pub.error_exit = on_error;
    err->pub.emit_message = on_message;
    err->pub.output_message = silent_output;
    err->message[0] = '\0';
    lib.create(cinfo, JPEG_LIB_VERSION, sizeof(struct jpeg_decompress_struct));
    lib.mem_src(cinfo, (const unsigned char *)data->buf, (unsigned long)data->len);
    lib.read_header(cinfo, TRUE);
}

static int decodable(const struct jpeg_decompress_struct *cinfo) {
    return (cinfo->jpeg_color_space == JCS_YCbCr || cinfo->jpeg_color_space == JCS_RGB ||
            cinfo->jpeg_color_space == JCS_GRAYSCALE) &&
           cinfo->data_precision == 8;
}

static int is_jpeg(const Py_buffer *data) {
    const unsigned char *b = (const unsigned char *)data->buf;
    return data->len >= 4 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF;
}

static int check_loaded(void) {
    if (lib.handle != NULL) return 1;
    PyErr_SetString(PyExc_RuntimeError, "_resnet_jpeg.load(path) has not succeeded");
    return 0;
}

static PyObject *header(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!check_loaded() || !PyArg_ParseTuple(args, "y*", &data)) return NULL;
    if (!is_jpeg(&data)) {
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    PyObject *result = NULL;
    if (setjmp(err.jump)) {
        lib.destroy(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "broken JPEG header: %s", err.message);
        return NULL;
    }
    open_decoder(&cinfo, &err, &data);
    if (decodable(&cinfo)) {
        result = Py_BuildValue("(IIi)", cinfo.image_width, cinfo.image_height,
                               cinfo.jpeg_color_space == JCS_GRAYSCALE ? 1 : 3);
    } else {
        result = Py_NewRef(Py_None);
    }
    lib.destroy(&cinfo);
    PyBuffer_Release(&data);
    return result;
}

/* ---- Pillow's BILINEAR resample (libImaging/Resample.c), on packed RGB ----
 * The same filter, coefficient rounding (22-bit fixed point) and pass order as Pillow's
 * Image.resize(..., BILINEAR, box=...), so the output matches it (up to the float32 rounding of
 * the box, which Pillow applies to the coordinates of the whole image and this to the region's):
 * one horizontal pass over the rows the vertical pass needs, then the vertical pass. Packed RGB
 * (Pillow works on 4-byte pixels), the vertical pass runs row-wise so it vectorises, and a flip
 * is the horizontal pass writing its columns in reverse. */
#define PRECISION_BITS (32 - 8 - 2)

static double bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Fills bounds[2 * out] (first input index, count) and fixed-point kernels kk[out * ksize];
 * returns ksize, or 0 when out of memory. */
static int coefficients(int in_size, double in0, double in1, int out_size, int **boundsp,
                        int32_t **kkp) {
    double scale = (in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *weights = PyMem_RawMalloc(sizeof(double) * ksize);
    int *bounds = PyMem_RawMalloc(sizeof(int) * 2 * out_size);
    int32_t *kk = PyMem_RawMalloc(sizeof(int32_t) * ksize * out_size);
    if (weights == NULL || bounds == NULL || kk == NULL) {
        PyMem_RawFree(weights);
        PyMem_RawFree(bounds);
        PyMem_RawFree(kk);
        return 0;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale, total = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            weights[x] = bilinear((x + xmin - center + 0.5) * ss);
            total += weights[x];
        }
        for (int x = 0; x < ksize; x++) {
            double w = x < xmax && total != 0.0 ? weights[x] / total : 0.0;
            kk[xx * ksize + x] = (int32_t)(w < 0 ? -0.5 + w * (1 << PRECISION_BITS)
                                                 : 0.5 + w * (1 << PRECISION_BITS));
        }
        bounds[2 * xx] = xmin;
        bounds[2 * xx + 1] = xmax;
    }
    PyMem_RawFree(weights);
    *boundsp = bounds;
    *kkp = kk;
    return ksize;
}

static inline unsigned char clip8(int32_t v) {
    v >>= PRECISION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : (unsigned char)v;
}

/* rgb: in_h rows of in_w packed RGB pixels; box in its pixel coordinates. Writes out_w x out_h
 * packed RGB to out (mirrored left-right when flip). Returns 0 when out of memory. */
static int resample(const unsigned char *rgb, int in_w, int in_h, const double box[4], int out_w,
                    int out_h, int flip, unsigned char *out) {
    int *hb = NULL, *vb = NULL;
    int32_t *hk = NULL, *vk = NULL, *acc = NULL;
    unsigned char *tmp = NULL;
    int ok = 0;
    /* Pillow reads the box as C floats */
    int hks = coefficients(in_w, (float)box[0], (float)box[2], out_w, &hb, &hk);
    int vks = hks ? coefficients(in_h, (float)box[1], (float)box[3], out_h, &vb, &vk) : 0;
    if (!vks) goto done;
    const int first = vb[0], last = vb[2 * out_h - 2] + vb[2 * out_h - 1];
    const int rows = last - first;
    tmp = PyMem_RawMalloc((size_t)rows * out_w * 3);
    acc = PyMem_RawMalloc(sizeof(int32_t) * out_w * 3);
    if (tmp == NULL || acc == NULL) goto done;
    for (int y = 0; y < rows; y++) {
        const unsigned char *src = rgb + (size_t)(y + first) * in_w * 3;
        unsigned char *dst = tmp + (size_t)y * out_w * 3;
        for (int xx = 0; xx < out_w; xx++) {
            const int32_t *k = hk + xx * hks;
            const unsigned char *p = src + hb[2 * xx] * 3;
            int32_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
            for (int x = 0; x < hb[2 * xx + 1]; x++, p += 3) {
                s0 += p[0] * k[x];
                s1 += p[1] * k[x];
                s2 += p[2] * k[x];
            }
            unsigned char *d = dst + (flip ? out_w - 1 - xx : xx) * 3;
            d[0] = clip8(s0);
            d[1] = clip8(s1);
            d[2] = clip8(s2);
        }
    }
    const int n = out_w * 3;
    for (int yy = 0; yy < out_h; yy++) {
        const int32_t *k = vk + yy * vks;
        const int ymin = vb[2 * yy] - first;
        for (int i = 0; i < n; i++) acc[i] = 1 << (PRECISION_BITS - 1);
        for (int y = 0; y < vb[2 * yy + 1]; y++) {
            const unsigned char *src = tmp + (size_t)(ymin + y) * n;
            const int32_t w = k[y];
            for (int i = 0; i < n; i++) acc[i] += src[i] * w;
        }
        unsigned char *dst = out + (size_t)yy * n;
        for (int i = 0; i < n; i++) dst[i] = clip8(acc[i]);
    }
    ok = 1;
done:
    PyMem_RawFree(hb);
    PyMem_RawFree(hk);
    PyMem_RawFree(vb);
    PyMem_RawFree(vk);
    PyMem_RawFree(tmp);
    PyMem_RawFree(acc);
    return ok;
}

static PyObject *decode_crop(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer data;
    unsigned int denom, x0, y0, x1, y1;
    double box[4];
    int out_w, out_h, flip;
    if (!check_loaded() ||
        !PyArg_ParseTuple(args, "y*I(IIII)(dddd)(ii)p", &data, &denom, &x0, &y0, &x1, &y1,
                          &box[0], &box[1], &box[2], &box[3], &out_w, &out_h, &flip))
        return NULL;
    if (!(denom == 1 || denom == 2 || denom == 4 || denom == 8) || x1 <= x0 || y1 <= y0 ||
        out_w <= 0 || out_h <= 0 || !(box[2] > box[0]) || !(box[3] > box[1])) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError,
                     "decode_crop got denom=%u, region [%u, %u) x [%u, %u), size %dx%d: denom "
                     "must be 1, 2, 4 or 8, the region, box and size non-empty",
                     denom, x0, x1, y0, y1, out_w, out_h);
        return NULL;
    }
    if (!is_jpeg(&data)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "not a JPEG (no SOI marker)");
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    /* volatile: assigned between setjmp and a possible longjmp */
    PyObject *volatile result = NULL;
    unsigned char *volatile pixels = NULL;
    JSAMPROW *volatile rows = NULL;
    PyThreadState *volatile released = NULL; /* non-NULL while the GIL is released */
    if (setjmp(err.jump)) {
        if (released != NULL) PyEval_RestoreThread(released);
        lib.destroy(&cinfo);
        PyMem_RawFree(rows);
        PyMem_RawFree(pixels);
        Py_XDECREF(result);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "broken JPEG: %s", err.message);
        return NULL;
    }
    open_decoder(&cinfo, &err, &data);
    if (!decodable(&cinfo)) {
        lib.destroy(&cinfo);
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = denom;
    cinfo.dct_method = JDCT_ISLOW; /* Pillow's settings, so pixels match its full decode */
    cinfo.do_fancy_upsampling = TRUE;
    released = PyEval_SaveThread(); /* progressive JPEGs decode every scan here */
    lib.start(&cinfo);
    PyEval_RestoreThread(released);
    released = NULL;
    if (x1 > cinfo.output_width || y1 > cinfo.output_height) {
        unsigned int width = cinfo.output_width, height = cinfo.output_height;
        lib.destroy(&cinfo);
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError,
                     "region [%u, %u) x [%u, %u) is outside the %ux%u image at 1/%u scale", x0,
                     x1, y0, y1, width, height, denom);
        return NULL;
    }
    JDIMENSION xoff = x0, width = x1 - x0;
    if (xoff > 0 || width < cinfo.output_width) lib.crop(&cinfo, &xoff, &width);
    const JDIMENSION height = y1 - y0;
    const size_t stride = (size_t)width * 3;
    result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)out_w * out_h * 3);
    pixels = PyMem_RawMalloc(stride * height);
    rows = PyMem_RawMalloc(sizeof(JSAMPROW) * height);
    if (result == NULL || pixels == NULL || rows == NULL) {
        lib.destroy(&cinfo);
        PyMem_RawFree(rows);
        PyMem_RawFree(pixels);
        Py_XDECREF(result);
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    for (JDIMENSION r = 0; r < height; r++) rows[r] = pixels + stride * r;
    JDIMENSION done = 0;
    released = PyEval_SaveThread();
    if (y0 > 0) lib.skip(&cinfo, y0);
    while (done < height) {
        JDIMENSION got = lib.read(&cinfo, rows + done, height - done);
        if (got == 0) break; /* suspended: cannot happen with a memory source */
        done += got;
    }
    PyEval_RestoreThread(released);
    released = NULL;
    const long warnings = cinfo.err->num_warnings;
    lib.abort(&cinfo); /* the rows below the region are never decoded */
    lib.destroy(&cinfo);
    PyMem_RawFree(rows);
    PyBuffer_Release(&data);
    if (warnings > 0 || done < height) {
        PyMem_RawFree(pixels);
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    const double region_box[4] = {box[0] - xoff, box[1] - y0, box[2] - xoff, box[3] - y0};
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = resample(pixels, (int)width, (int)height, region_box, out_w, out_h, flip,
                  (unsigned char *)PyByteArray_AS_STRING(result));
    Py_END_ALLOW_THREADS;
    PyMem_RawFree(pixels);
    if (!ok) {
        Py_DECREF(result);
        return PyErr_NoMemory();
    }
    return result;
}

static PyMethodDef methods[] = {
    {"load", load, METH_VARARGS, "load(path): dlopen a libjpeg-turbo shared library."},
    {"header", header, METH_VARARGS,
     "header(data) -> (width, height, colour) or None when this module cannot decode it."},
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, denom, region, box, size, flip) -> bytearray of packed RGB, or None "
     "when libjpeg warned."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resnet_jpeg",
    "Region decoding of JPEGs through libjpeg-turbo (see resnet_core/jpeg.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__resnet_jpeg(void) { return PyModule_Create(&module); }
