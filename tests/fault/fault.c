/*
 * A fault injector for the end-to-end tests, loaded into vski with LD_PRELOAD.
 *
 * While the file named by VSKI_FAULT_FILE exists, the next read (pread/pread64) of a database
 * file or its WAL (a path ending in ".db" or ".db-wal"), past the first page, fails with EIO, and the file is removed, so exactly one read
 * fails per trigger. This is how a failing disk looks to SQLite: an I/O error in the middle of
 * a write transaction, after which SQLite may roll the whole transaction back.
 *
 * When VSKI_FAULT_THREAD is set, only a thread whose name starts with it can take the fault
 * (say "writer-default"): other threads read the same files (the checkpointer, the read pool),
 * and a fault they took would not reach the transaction under test.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <unistd.h>

static int should_fail(int fd, off_t offset) {
    const char *trigger = getenv("VSKI_FAULT_FILE");
    /* The header page is read at the start of every transaction; the fault is meant for the
     * data pages a write job reads. */
    if (offset == 0) {
        return 0;
    }
    if (trigger == NULL || access(trigger, F_OK) != 0) {
        return 0;
    }
    const char *thread = getenv("VSKI_FAULT_THREAD");
    if (thread != NULL) {
        char name[17] = {0};
        if (prctl(PR_GET_NAME, name) != 0 || strncmp(name, thread, strlen(thread)) != 0) {
            return 0;
        }
    }
    char link[64];
    char path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 3) {
        return 0;
    }
    path[n] = '\0';
    int db = strcmp(path + n - 3, ".db") == 0;
    int wal = n > 7 && strcmp(path + n - 7, ".db-wal") == 0;
    if (!db && !wal) {
        return 0;
    }
    /* Only the caller that removes the trigger fails: one fault per trigger. */
    return unlink(trigger) == 0;
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (real == NULL) {
        real = (ssize_t(*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
    }
    if (should_fail(fd, offset)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count, offset);
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (real == NULL) {
        real = (ssize_t(*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread");
    }
    if (should_fail(fd, offset)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count, offset);
}
