/* LD_PRELOAD for tests/test_server.py: widens the moment between a process's last look at its
   signal flags and the blocking wait it then makes. Only the session leader (the gateway's
   parent, started with start_new_session) pauses 300 ms before each blocking wait; a signal's
   C-level handler runs during the pause, as it would in the real, microseconds-wide moment.
   With LATE_BLOCK=after-fork, instead, each new child pauses 300 ms right after fork(), before
   the Python code that sets up its signals runs. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void pause_300ms(void) {
    struct timespec left = {0, 300L * 1000 * 1000};
    while (nanosleep(&left, &left) == -1) {}
}

static int after_fork(void) {
    const char *mode = getenv("LATE_BLOCK");
    return mode != NULL && strcmp(mode, "after-fork") == 0;
}

static void pause_first(void) {
    if (getsid(0) == getpid() && !after_fork()) pause_300ms();
}

__attribute__((constructor)) static void pause_new_children(void) {
    if (after_fork()) pthread_atfork(NULL, NULL, pause_300ms);
}

pid_t wait(int *status) {
    static pid_t (*real)(int *);
    if (!real) real = dlsym(RTLD_NEXT, "wait");
    pause_first();
    return real(status);
}

pid_t waitpid(pid_t pid, int *status, int options) {
    static pid_t (*real)(pid_t, int *, int);
    if (!real) real = dlsym(RTLD_NEXT, "waitpid");
    if (!(options & WNOHANG)) pause_first();
    return real(pid, status, options);
}

int epoll_wait(int fd, struct epoll_event *events, int max, int timeout) {
    static int (*real)(int, struct epoll_event *, int, int);
    if (!real) real = dlsym(RTLD_NEXT, "epoll_wait");
    if (timeout != 0) pause_first();
    return real(fd, events, max, timeout);
}
